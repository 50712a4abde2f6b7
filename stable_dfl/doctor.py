"""``python -m stable_dfl doctor [--json]``: checks the installed package, not its sources.

Each check has a stable ``name`` (``--json``):

* ``extension_loaded``: the compiled ``stable_dfl._C`` loaded (else every CPU call runs
  the slow eager reference).
* ``agreement:<backend>@<device>:<inputs>``: each usable backend against the float64
  reference, on ``random`` and ``extreme`` inputs (``stable_dfl.backend_checks``).
* ``dfl_clamps``: a hopeless prediction (the target bins at -1e4, the others at +1e4,
  fp32 and fp16) gives a finite per-element loss at most ``-ln(eps)``, a reduced loss
  capped at ``max_loss`` and a finite gradient.
* ``head_init``: a freshly built detector's first DFL is within ``HEAD_INIT_DFL_TOLERANCE``
  of ``log(n_bins)`` for both heads, its box logits are below ``HEAD_INIT_MAX_LOGIT`` and
  its mean class score is near the prior.
* ``smoke_training``: 20 training steps of a tiny detector on CPU (``--amp auto``: bf16
  autocast where the CPU computes bf16 natively, else full precision; the check names
  which) with no NaN/Inf loss or gradient and no skipped step.

Exit code: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import __version__
from .backend_checks import (
    INPUT_KINDS,
    agreement,
    agrees,
    backend_availability,
    cpu_kernel_line,
    installation,
)
from .loss import stable_dfl_loss
from .ops import backends
from .ops.reference import DEFAULT_EPS, DEFAULT_MAX_LOSS

#: ``|initial DFL - log(n_bins)|`` allowed, as a fraction of ``log(n_bins)``.
HEAD_INIT_DFL_TOLERANCE = 0.02
#: Largest initial box logit allowed: well below the gaps (~17 in fp16) where a softmax
#: probability underflows.
HEAD_INIT_MAX_LOGIT = 1.0
#: Mean initial class score allowed (the prior is 0.01).
HEAD_INIT_MAX_SCORE = 0.05
SMOKE_STEPS = 20


@dataclass
class DoctorCheck:
    name: str
    ok: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)


def check_extension() -> DoctorCheck:
    error = backends.extension_error()
    summary = installation()
    detail = (
        f"built {'with' if backends.compiled_available('cuda') else 'without'} CUDA kernels; "
        f"CPU kernels {cpu_kernel_line(summary)}"
        if error is None
        else f"not loaded: {error}"
    )
    values = {key: summary[key] for key in ("cpu_kernel_isa", "cpu_kernel_isas")}
    return DoctorCheck("extension_loaded", error is None, detail, values)


def check_agreement() -> list[DoctorCheck]:
    checks = []
    for availability in backend_availability():
        if not availability.usable:
            continue
        for kind in INPUT_KINDS:
            errors = agreement(availability.backend, torch.device(availability.device), kind)
            checks.append(
                DoctorCheck(
                    f"agreement:{availability.backend}@{availability.device}:{kind}",
                    agrees(errors),
                    f"max |loss - ref| {errors['loss']:.2e}, max |grad - ref| {errors['grad']:.2e}",
                    {"max_loss_error": errors["loss"], "max_grad_error": errors["grad"]},
                )
            )
    return checks


def check_dfl_clamps(
    n_bins: int = 16, eps: float = DEFAULT_EPS, max_loss: float = DEFAULT_MAX_LOSS
) -> DoctorCheck:
    values: dict[str, Any] = {}
    ok = True
    element_bound = -math.log(eps)
    for dtype, magnitude in ((torch.float32, 1e4), (torch.float16, 6e4)):
        rows = 64
        target = torch.full((rows,), 3.5)  # the mass belongs on bins 3 and 4
        pred = torch.full((rows, n_bins), magnitude)
        pred[:, 3:5] = -magnitude
        pred = pred.to(dtype).requires_grad_()
        clamps = {"n_bins": n_bins, "eps": eps, "max_loss": max_loss}
        per_element = stable_dfl_loss(pred, target, reduction="none", **clamps)
        weighted = stable_dfl_loss(pred, target, torch.full((rows,), 10.0), **clamps)
        (grad,) = torch.autograd.grad(weighted, pred)
        name = str(dtype).removeprefix("torch.")
        values[name] = {
            "max_element_loss": per_element.max().item(),
            "reduced_loss": weighted.item(),
            "grad_finite": bool(torch.isfinite(grad).all()),
        }
        ok &= (
            bool(torch.isfinite(per_element).all())
            and per_element.max().item() <= element_bound + 1e-3
            and math.isclose(weighted.item(), max_loss, rel_tol=1e-6)
            and values[name]["grad_finite"]
        )
    detail = (
        f"hopeless prediction: element loss {values['float32']['max_element_loss']:.2f} "
        f"(bound -ln(eps) = {element_bound:.2f}), reduced {values['float32']['reduced_loss']:.2f} "
        f"(cap {max_loss:g}), gradients finite: "
        f"{values['float32']['grad_finite'] and values['float16']['grad_finite']}"
    )
    return DoctorCheck("dfl_clamps", ok, detail, values)


@torch.no_grad()
def check_head_init(n_bins: int = 16, num_classes: int = 3) -> DoctorCheck:
    from .models import DualHeadDetector

    torch.manual_seed(0)
    model = DualHeadDetector(num_classes, n_bins, width=4, fpn_channels=16, embed_dim=8)
    output = model(torch.randn(2, 3, 64, 64))
    expected = math.log(n_bins)
    values: dict[str, Any] = {"expected_dfl": expected}
    ok = True
    for head, (box_logits, cls_logits) in output.heads.items():
        target = torch.rand((*box_logits.shape[:-1], 4)) * (n_bins - 1)
        dfl = stable_dfl_loss(box_logits, target, n_bins=n_bins).item()
        max_logit = box_logits.abs().max().item()
        mean_score = cls_logits.sigmoid().mean().item()
        values[head] = {
            "initial_dfl": dfl,
            "max_box_logit": max_logit,
            "mean_class_score": mean_score,
        }
        ok &= (
            abs(dfl - expected) <= HEAD_INIT_DFL_TOLERANCE * expected
            and max_logit <= HEAD_INIT_MAX_LOGIT
            and mean_score <= HEAD_INIT_MAX_SCORE
        )
    detail = "; ".join(
        f"{head}: DFL {v['initial_dfl']:.3f} (log {n_bins} = {expected:.3f}), "
        f"max |box logit| {v['max_box_logit']:.3f}, mean score {v['mean_class_score']:.3f}"
        for head, v in values.items()
        if head != "expected_dfl"
    )
    return DoctorCheck("head_init", ok, detail, values)


def check_smoke_training(steps: int = SMOKE_STEPS) -> DoctorCheck:
    from .report.metrics import load_run
    from .train import TrainConfig, Trainer
    from .train.distributed import DistContext

    batch_size = 8
    with tempfile.TemporaryDirectory(prefix="stable_dfl_doctor_") as save_dir:
        config = TrainConfig(
            save_dir=save_dir,
            train_images=steps * batch_size,
            val_images=8,
            batch_size=batch_size,
            epochs=1,
            width=4,
            fpn_channels=16,
            embed_dim=8,
            warmup_steps=5,
            device="cpu",
        )
        started = time.perf_counter()
        trainer = Trainer(
            config,
            DistContext(rank=0, world_size=1, device=torch.device("cpu")),
            console=io.StringIO(),
        )
        trainer.fit()
        seconds = time.perf_counter() - started
        run = load_run(save_dir)
    losses = run.series("total_loss")
    values = {
        "steps": len(run.steps),
        "nonfinite_losses": sum(1 for v in losses if not math.isfinite(v)),
        "nonfinite_gradient_steps": sum(1 for r in run.steps if not r["grad_finite"]),
        "skipped_steps": sum(1 for r in run.steps if r["skipped"]),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "seconds": round(seconds, 2),
        "precision": trainer.precision.name,
        "precision_reason": trainer.precision.reason,
    }
    ok = (
        values["steps"] == steps
        and values["nonfinite_losses"] == 0
        and values["nonfinite_gradient_steps"] == 0
        and values["skipped_steps"] == 0
    )
    detail = (
        f"{values['steps']} steps in {seconds:.1f}s, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"{values['nonfinite_gradient_steps']} NaN/Inf steps, {values['skipped_steps']} skipped; "
        f"{trainer.precision.reason}"
    )
    return DoctorCheck("smoke_training", ok, detail, values)


def run_checks() -> list[DoctorCheck]:
    return [
        check_extension(),
        *check_agreement(),
        check_dfl_clamps(),
        check_head_init(),
        check_smoke_training(),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stable_dfl doctor",
        description="Check the installed package: backends and their agreement with the "
        "reference, DFL clamps, head init, a 20-step smoke training. Exit 1 on any failure.",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    checks = run_checks()
    ok = all(check.ok for check in checks)
    summary = installation()
    if args.json:
        document = {
            "ok": ok,
            "versions": {
                "stable_dfl": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "cpu_kernel_isa": summary["cpu_kernel_isa"],
            "cpu_kernel_isas": summary["cpu_kernel_isas"],
            "backends": [{**asdict(a), "usable": a.usable} for a in backend_availability()],
            "checks": [asdict(check) for check in checks],
        }
        print(json.dumps(document, indent=2))
    else:
        print(f"stable_dfl {__version__}, torch {torch.__version__}")
        print(f"  CPU kernels {cpu_kernel_line(summary)}")
        for availability in backend_availability():
            state = "usable" if availability.usable else f"not usable: {availability.reason}"
            print(f"  backend {availability.backend:>9} on {availability.device:<4} {state}")
        print()
        for check in checks:
            print(f"{'ok  ' if check.ok else 'FAIL'}  {check.name:<32} {check.detail}")
        print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'}")
    return 0 if ok else 1
