"""The precision ``--amp`` picks: bf16 autocast on a CPU only where the CPU computes bf16
natively, fp16 on CUDA, explicit choices as given; the run's first log line says which and
why. The bf16 detection is forced both ways, so every branch runs on any CPU."""

from __future__ import annotations

import io

import pytest
import torch

from stable_dfl import doctor
from stable_dfl.train import Trainer, default_cpu_precision, precision, resolve_precision

from ..support.runs import CPU, tiny_config

CPU_DEVICE, CUDA_DEVICE = torch.device("cpu"), torch.device("cuda")
NATIVE_REASON = "bf16 autocast: this CPU computes bf16 natively"
EMULATED_REASON = "full precision: this CPU has no native bf16, where bf16 autocast is emulated"


@pytest.fixture(params=[True, False], ids=["native_bf16", "no_native_bf16"])
def native_bf16(request, monkeypatch) -> bool:
    """Makes the CPU report native bf16 or not, whatever this machine's CPU does."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: request.param)
    return request.param


def test_auto_on_a_cpu_is_bf16_only_where_it_is_native():
    native = default_cpu_precision(native_bf16=True)
    assert native.dtype == torch.bfloat16 and native.name == "bf16"
    assert native.reason.startswith(NATIVE_REASON)
    emulated = default_cpu_precision(native_bf16=False)
    assert emulated.dtype is None and emulated.name == "off"
    assert emulated.reason.startswith(EMULATED_REASON)
    for flag in (True, False):
        chosen = resolve_precision("auto", CPU_DEVICE, native_bf16=flag)
        assert chosen == default_cpu_precision(flag)


def test_auto_follows_the_detection(native_bf16):
    chosen = resolve_precision("auto", CPU_DEVICE)
    assert chosen.dtype == (torch.bfloat16 if native_bf16 else None)
    assert chosen == default_cpu_precision()


def test_auto_on_cuda_is_fp16_whatever_the_cpu(native_bf16):
    chosen = resolve_precision("auto", CUDA_DEVICE)
    assert chosen.dtype == torch.float16 and "GradScaler" in chosen.reason


def test_explicit_choices_are_kept(native_bf16):
    for device in (CPU_DEVICE, CUDA_DEVICE):
        off = resolve_precision("off", device)
        assert off.dtype is None and off.reason == "full precision: --amp off"
        fp16 = resolve_precision("fp16", device)
        assert fp16.dtype == torch.float16 and "--amp fp16" in fp16.reason
        bf16 = resolve_precision("bf16", device)
        assert bf16.dtype == torch.bfloat16 and "--amp bf16" in bf16.reason
    # A forced bf16 on a CPU without native bf16 still says what it costs.
    slow = "no native bf16" in resolve_precision("bf16", CPU_DEVICE).reason
    assert slow == (not native_bf16)
    assert "no native bf16" not in resolve_precision("bf16", CUDA_DEVICE).reason
    with pytest.raises(ValueError, match="--amp must be auto, off, bf16 or fp16"):
        resolve_precision("fp8", CPU_DEVICE)


def test_detection_without_onednn_or_its_op_is_no_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert precision.cpu_has_native_bf16() is False
    monkeypatch.undo()

    def missing():
        raise RuntimeError("no such operator mkldnn::_is_mkldnn_bf16_supported")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", missing)
    assert precision.cpu_has_native_bf16() is False


def test_the_first_log_line_names_the_precision_and_why(tmp_path, native_bf16, one_cpu_thread):
    console = io.StringIO()
    trainer = Trainer(tiny_config(tmp_path, amp="auto"), CPU, console=console)
    trainer.fit()
    expected = default_cpu_precision(native_bf16)
    assert trainer.precision == expected and trainer.amp_dtype == expected.dtype
    assert not trainer.scaler.is_enabled(), "no loss scaling without fp16"
    lines = (tmp_path / "training_debug.log").read_text().splitlines()
    assert lines[0] == expected.reason
    assert console.getvalue().splitlines()[0] == expected.reason
    assert f"amp={expected.name}," in lines[1]


def test_doctor_smoke_training_reports_its_precision(native_bf16, one_cpu_thread):
    check = doctor.check_smoke_training(steps=4)
    expected = default_cpu_precision(native_bf16)
    assert check.ok
    assert check.values["precision"] == expected.name
    assert check.values["precision_reason"] == expected.reason
    assert check.detail.endswith(expected.reason)
