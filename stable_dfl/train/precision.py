"""Which autocast dtype a run uses, and the one-line reason the log gives for it.

``--amp auto`` is fp16 + GradScaler on CUDA. On a CPU it is bf16 only where the CPU
computes bf16 natively: elsewhere bf16 is emulated and a convolution under bf16 autocast
takes ~50x as long as in fp32 (544 ms against 11 ms for a 16x64x32x32 3x3 convolution on
an AVX2 EPYC; the default stage-2 run, 55 min against 5), so full precision is the
faster default there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AMP_NAMES: dict[torch.dtype | None, str] = {
    None: "off",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}
_NO_NATIVE_BF16 = "this CPU has no native bf16, where bf16 autocast is emulated, up to ~50x slower"


@dataclass(frozen=True)
class Precision:
    """An autocast dtype (None: full precision) and why it was picked."""

    dtype: torch.dtype | None
    reason: str

    @property
    def name(self) -> str:
        """``off``, ``fp16`` or ``bf16``, as ``--amp`` spells it."""
        return AMP_NAMES[self.dtype]


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN computes bf16 natively on this CPU (e.g. AVX512-BF16, AMX)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the op
        return False


def default_cpu_precision(native_bf16: bool | None = None) -> Precision:
    """The CPU's default autocast: bf16 where the CPU computes it natively, else none.

    ``native_bf16`` overrides the detection (:func:`cpu_has_native_bf16`)."""
    if native_bf16 is None:
        native_bf16 = cpu_has_native_bf16()
    if native_bf16:
        return Precision(
            torch.bfloat16, "bf16 autocast: this CPU computes bf16 natively, as oneDNN reports"
        )
    return Precision(None, f"full precision: {_NO_NATIVE_BF16}")


def resolve_precision(amp: str, device: torch.device, native_bf16: bool | None = None) -> Precision:
    """The precision of ``--amp`` (``auto``, ``off``, ``bf16``, ``fp16``) on ``device``.

    ``native_bf16`` overrides the CPU's bf16 detection, as in :func:`default_cpu_precision`."""
    if amp == "off":
        return Precision(None, "full precision: --amp off")
    if amp == "bf16":
        slow = device.type == "cpu" and default_cpu_precision(native_bf16).dtype is None
        note = f", though {_NO_NATIVE_BF16}" if slow else ""
        return Precision(torch.bfloat16, f"bf16 autocast: --amp bf16{note}")
    if amp == "fp16":
        return Precision(torch.float16, "fp16 autocast + GradScaler: --amp fp16")
    if amp != "auto":
        raise ValueError(f"--amp must be auto, off, bf16 or fp16, got {amp!r}")
    if device.type == "cuda":
        return Precision(torch.float16, "fp16 autocast + GradScaler: the default on CUDA")
    return default_cpu_precision(native_bf16)
