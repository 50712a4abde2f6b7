"""What a whole step gains, under pytest-benchmark (``python bench/bench_step.py`` runs and
renders it).

(a) ultralytics' own ``v8DetectionLoss``, forward + backward from the head outputs of a
    ``yolov8n.yaml`` model (80 classes) at batch 8 and 640 px (8,400 anchors per image), 10-50
    boxes per image: unpatched, and patched with ``stable_dfl.integrations.ultralytics``; and
    the DFL module alone (forward + backward) on the very inputs that loss hands it.
(b) One training step of the dual-head detector (the trainer's own step: forward, loss,
    backward, gradient check and clip, optimizer and EMA) at batch 8, with the fused DFL or the
    eager reference DFL, and with ``GradGuard`` or the plain clip recipe; and the DFL call
    alone on the inputs the criterion hands it. Image sizes: 64 px (the stage-2 default run)
    and 640 px.

    The gradient check alone: the optimizer stepper (``GradGuard`` or the plain clip step,
    optimizer step included) on the gradients of that step, refreshed from a copy before each
    call (so that repeated clipping cannot shrink them into denormals); ``grad_refresh`` times
    the refresh alone.

The shares of the DFL and of the gradient check in each step are those alone-timings over the
step's.

(c) Forensics: a step that is taken with forensics off, the ratio of steps with it on and
    off (alternating), and the replay of a skipped step's batch (``explain_step`` as the trainer calls it,
    writing its JSON) for a corrupt label and for a NaN pixel.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import common
import pytest
import torch
from torch.utils._pytree import tree_leaves, tree_map

from stable_dfl import StableDFLLoss
from stable_dfl.train import DistContext, TrainConfig, Trainer

pytestmark = pytest.mark.benchmark(warmup=False, disable_gc=True)

#: Timed rounds per case: as many as fit the seconds, within the bounds.
BUDGET = common.RoundBudget(4.0, 5, 30, 2)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
CPU = DistContext(0, 1, torch.device("cpu"))
BATCH = 8
ULTRALYTICS_SIZE, QUICK_ULTRALYTICS_SIZE = 640, 128
DETECTOR_SIZES, QUICK_DETECTOR_SIZES = (64, 640), (64,)
#: (DFL, optimizer step) of each detector-step provider.
DETECTOR_PROVIDERS = {
    "fused_dfl+guard": ("fused", "on"),
    "eager_dfl+clip": ("eager", "off"),
    "fused_dfl+clip": ("fused", "off"),
    "eager_dfl+guard": ("eager", "on"),
}


class _Recording(torch.nn.Module):
    """Calls ``inner``, keeping copies of the arguments of the first call (ultralytics'
    ``DFLoss`` overrides ``__call__``, so forward hooks never see it; it also clamps its
    target in place)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.reg_max = getattr(inner, "reg_max", None)
        self.calls: list[tuple[tuple, dict]] = []

    def forward(self, *args, **kwargs):
        if not self.calls:
            copy = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
            self.calls.append((tree_map(copy, args), tree_map(copy, kwargs)))
        return self.inner(*args, **kwargs)


def captured_call(owner: torch.nn.Module, name: str, run: Callable[[], object]):
    """The arguments of the first call of ``owner.<name>`` while ``run`` runs."""
    original = getattr(owner, name)
    recording = _Recording(original)
    setattr(owner, name, recording)
    try:
        run()
    finally:
        setattr(owner, name, original)
    return recording.calls[0]


def dfl_alone_step(module: torch.nn.Module, args: tuple, kwargs: dict) -> Callable[[], object]:
    """Forward + backward of ``module`` alone on a leaf copy of the captured logits."""
    pred = args[0].clone().requires_grad_()
    rest = args[1:]

    def step():
        module(pred, *rest, **kwargs).sum().backward()
        pred.grad = None

    return step


# ------------------------------------------------------------------ (a) ultralytics


@pytest.fixture(scope="module")
def ultralytics_setup(quick):
    os.environ.setdefault("YOLO_OFFLINE", "1")
    pytest.importorskip("ultralytics")
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    size = QUICK_ULTRALYTICS_SIZE if quick else ULTRALYTICS_SIZE
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=80, verbose=False).train()
    model.args = get_cfg(DEFAULT_CFG)
    with torch.no_grad():
        # ultralytics 8.4: {"boxes", "scores", "feats"}; older: a list of feature maps.
        preds = tree_map(torch.Tensor.detach, model(torch.rand(BATCH, 3, size, size)))
    generator = torch.Generator().manual_seed(0)
    counts = torch.randint(10, 51, (BATCH,), generator=generator)
    n_boxes = int(counts.sum())
    centers = torch.rand(n_boxes, 2, generator=generator) * 0.8 + 0.1
    sizes = torch.rand(n_boxes, 2, generator=generator) * 0.15 + 0.02
    batch = {
        "batch_idx": torch.repeat_interleave(torch.arange(BATCH), counts).float(),
        "cls": torch.randint(0, 80, (n_boxes, 1), generator=generator).float(),
        "bboxes": torch.cat([centers, sizes], 1),
    }
    return model, preds, batch, size


def ultralytics_criterion(model, provider: str):
    from ultralytics.utils.loss import v8DetectionLoss

    from stable_dfl.integrations import ultralytics as stable_ultralytics

    criterion = v8DetectionLoss(model)
    if provider == "patched":
        assert stable_ultralytics.patch_criterion(criterion) == 1
    return criterion


@pytest.mark.parametrize("provider", ["unpatched", "patched"])
def test_ultralytics_loss(benchmark, ultralytics_setup, provider, quick):
    model, preds, batch, size = ultralytics_setup
    benchmark.group = f"ultralytics v8DetectionLoss fwd+bwd, batch {BATCH}, {size} px"
    criterion = ultralytics_criterion(model, provider)
    leaves = tree_map(lambda p: p.clone().requires_grad_(), preds)

    def step():
        loss, _ = criterion(leaves, batch)
        loss.sum().backward()
        for leaf in tree_leaves(leaves):
            leaf.grad = None

    common.run_timed(
        benchmark,
        step,
        quick,
        BUDGET,
        kernel="v8_detection_loss",
        provider=provider,
        mode="forward_backward",
        dtype="fp32",
        x=size,
    )


@pytest.mark.parametrize("provider", ["unpatched", "patched"])
def test_ultralytics_dfl_alone(benchmark, ultralytics_setup, provider, quick):
    model, preds, batch, size = ultralytics_setup
    benchmark.group = f"ultralytics DFL alone fwd+bwd, batch {BATCH}, {size} px"
    criterion = ultralytics_criterion(model, provider)
    dfl = criterion.bbox_loss.dfl_loss
    args, kwargs = captured_call(criterion.bbox_loss, "dfl_loss", lambda: criterion(preds, batch))
    common.run_timed(
        benchmark,
        dfl_alone_step(dfl, args, kwargs),
        quick,
        BUDGET,
        kernel="v8_dfl_alone",
        provider=provider,
        mode="forward_backward",
        dtype="fp32",
        x=size,
    )


@pytest.mark.parametrize("provider", ["unpatched", "patched"])
def test_ultralytics_dfl_error_under_cpu_bf16_autocast(benchmark, ultralytics_setup, provider):
    """The largest error, against float64, of the DFL on the inputs ultralytics' ``BboxLoss``
    hands it when the model and the loss run under CPU bf16 autocast (recorded, not timed)."""
    from ultralytics.utils.loss import DFLoss as UpstreamDFLoss

    model, _, batch, size = ultralytics_setup
    benchmark.group = f"ultralytics DFL error under CPU bf16 autocast, batch {BATCH}, {size} px"
    criterion = ultralytics_criterion(model, provider)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        preds = model(torch.rand(BATCH, 3, size, size, generator=torch.Generator().manual_seed(2)))
        dfl = criterion.bbox_loss.dfl_loss
        (pred_dist, target), _ = captured_call(
            criterion.bbox_loss, "dfl_loss", lambda: criterion(preds, batch)
        )
        loss = dfl(pred_dist, target.clone())
    exact = UpstreamDFLoss(dfl.reg_max)(pred_dist.double(), target.double())
    common.record_case(
        benchmark,
        kernel="v8_dfl_bf16_autocast_error",
        provider=provider,
        mode="forward",
        dtype=DTYPE_NAMES[pred_dist.dtype],
        x=size,
        metric="max_abs_error_vs_float64",
        value=(loss.double() - exact).abs().max().item(),
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


# ------------------------------------------------------------ (b) the dual-head detector


def detector_trainer(tmp_path: Path, size: int, provider: str, batch: int) -> Trainer:
    dfl, guard = DETECTOR_PROVIDERS[provider]
    config = TrainConfig(
        save_dir=str(tmp_path / provider),
        device="cpu",
        image_size=size,
        batch_size=batch,
        train_images=batch,
        val_images=batch,
        epochs=BUDGET.max_rounds + 2,  # the schedule outlasts the timed steps
        nan_guard=guard,
        log_interval=10**6,
        debug_interval=10**6,
    )
    trainer = Trainer(config, CPU, console=None)
    if dfl == "eager":
        trainer.criterion.dfl = StableDFLLoss(
            n_bins=config.n_bins, reduction="mean", backend="reference"
        )
    return trainer


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "detector_size" in metafunc.fixturenames:
        quick = metafunc.config.getoption("--bench-quick")
        metafunc.parametrize("detector_size", QUICK_DETECTOR_SIZES if quick else DETECTOR_SIZES)


def time_train_step(benchmark, trainer: Trainer, size: int, quick: bool, **info) -> None:
    """Times the trainer's own step on its first batch, then closes the trainer."""
    batch = next(iter(trainer.train_loader))
    try:
        common.run_timed(
            benchmark,
            lambda: trainer._train_step(batch),
            quick,
            BUDGET,
            mode="train_step",
            dtype=DTYPE_NAMES[trainer.amp_dtype or torch.float32],
            x=size,
            **info,
        )
    finally:
        trainer.close()


@pytest.mark.parametrize("provider", list(DETECTOR_PROVIDERS))
def test_detector_step(benchmark, tmp_path, detector_size, provider, quick):
    batch_size = 2 if quick else BATCH
    trainer = detector_trainer(tmp_path, detector_size, provider, batch_size)
    benchmark.group = f"detector train step, batch {batch_size}, {detector_size} px"
    time_train_step(
        benchmark, trainer, detector_size, quick, kernel="detector_step", provider=provider
    )


@pytest.mark.parametrize("provider", ["fused_dfl+guard", "eager_dfl+clip"])
def test_detector_dfl_alone(benchmark, tmp_path, detector_size, provider, quick):
    batch_size = 2 if quick else BATCH
    trainer = detector_trainer(tmp_path, detector_size, provider, batch_size)
    benchmark.group = f"detector DFL alone fwd+bwd, batch {batch_size}, {detector_size} px"
    batch = next(iter(trainer.train_loader))
    try:
        args, kwargs = captured_call(trainer.criterion, "dfl", lambda: trainer._train_step(batch))
        common.run_timed(
            benchmark,
            dfl_alone_step(trainer.criterion.dfl, args, kwargs),
            quick,
            BUDGET,
            kernel="detector_dfl_alone",
            provider=provider,
            mode="forward_backward",
            dtype=DTYPE_NAMES[args[0].dtype],
            x=detector_size,
        )
    finally:
        trainer.close()


@pytest.mark.parametrize("provider", ["guard", "plain_clip", "grad_refresh"])
def test_detector_optimizer_step(benchmark, tmp_path, detector_size, provider, quick):
    batch_size = 2 if quick else BATCH
    trainer_provider = "fused_dfl+clip" if provider == "plain_clip" else "fused_dfl+guard"
    trainer = detector_trainer(tmp_path, detector_size, trainer_provider, batch_size)
    benchmark.group = f"detector optimizer step alone, batch {batch_size}, {detector_size} px"
    batch = next(iter(trainer.train_loader))
    try:
        stepper = trainer.guard
        captured = {}

        def keep_gradients(optimizer, scaler):
            captured["grads"] = [p.grad for p in trainer.model.parameters() if p.grad is not None]
            captured["pristine"] = [g.clone() for g in captured["grads"]]
            return original_step(optimizer, scaler)

        original_step = stepper.step
        stepper.step = keep_gradients
        trainer._train_step(batch)
        stepper.step = original_step
        grads, pristine = captured["grads"], captured["pristine"]

        def step():
            torch._foreach_copy_(grads, pristine)
            if provider != "grad_refresh":
                stepper.step(trainer.optimizer, trainer.scaler)

        common.run_timed(
            benchmark,
            step,
            quick,
            BUDGET,
            kernel="detector_optimizer_step",
            provider=provider,
            mode="step",
            dtype="fp32",
            x=detector_size,
        )
    finally:
        trainer.close()


# ------------------------------------------------------- (c) forensics of a skipped step


def _plant_nan_box(targets, image: int):
    """A corrupt label (a NaN corner) in one image: the loss goes NaN, the step is skipped."""
    boxes = targets.boxes.clone()
    boxes[image, 0, 0] = float("nan")
    return type(targets)(targets.labels, boxes, targets.valid)


def test_detector_step_forensics_off(benchmark, tmp_path, quick):
    """A step that is taken, with forensics off: the reference of the costs below."""
    batch_size = 2 if quick else BATCH
    trainer = detector_trainer(tmp_path, 64, "fused_dfl+guard", batch_size)
    trainer.forensics.remaining = 0
    benchmark.group = f"detector train step, forensics, batch {batch_size}, 64 px"
    time_train_step(
        benchmark, trainer, 64, quick, kernel="detector_step_forensics", provider="forensics_off"
    )


def test_detector_step_forensics_interleaved(benchmark, tmp_path, quick):
    """A step that is taken, with forensics on (the default) and off, the steps alternating so
    that the machine's drift falls on both alike: the ratio of their medians (recorded). Timed
    as two cases one after the other, the first was ~10% slower whichever it was."""
    import statistics
    import time

    batch_size = 2 if quick else BATCH
    trainer = detector_trainer(tmp_path, 64, "fused_dfl+guard", batch_size)
    benchmark.group = f"detector train step, forensics, batch {batch_size}, 64 px"
    batch = next(iter(trainer.train_loader))
    times: dict[int, list[float]] = {0: [], trainer.config.forensics_steps: []}
    try:
        trainer._train_step(batch)
        for _ in range(BUDGET.quick_rounds if quick else BUDGET.max_rounds):
            for remaining, samples in times.items():
                trainer.forensics.remaining = remaining
                started = time.perf_counter()
                trainer._train_step(batch)
                samples.append(time.perf_counter() - started)
    finally:
        trainer.close()
    off, on = (statistics.median(samples) for samples in times.values())
    common.record_case(
        benchmark,
        kernel="detector_step_forensics",
        provider="on_over_off_interleaved",
        mode="train_step",
        dtype=DTYPE_NAMES[trainer.amp_dtype or torch.float32],
        x=64,
        metric="median_ratio",
        value=on / off,
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


@pytest.mark.parametrize("fault", ["nan_label", "nan_image"])
def test_skipped_step_replay(benchmark, tmp_path, fault, quick):
    """``explain_step`` on the batch of a skipped step, as the trainer calls it: a corrupt
    label (found in the loss, then the batch bisected) or a NaN pixel (found in the input)."""
    from stable_dfl.data import DetectionBatch
    from stable_dfl.models import DetectionTargets

    batch_size = 2 if quick else BATCH
    trainer = detector_trainer(tmp_path, 64, "fused_dfl+guard", batch_size)
    benchmark.group = f"skipped-step replay, batch {batch_size}, 64 px"
    batch: DetectionBatch = next(iter(trainer.train_loader))
    targets = DetectionTargets(batch.labels, batch.boxes, batch.valid)
    images = batch.images
    if fault == "nan_label":
        targets = _plant_nan_box(targets, batch_size - 1)
    else:
        images = images.clone()
        images[-1, 0, 0, 0] = float("nan")

    def replay():
        trainer.forensics.remaining = 1
        trainer.forensics.after_skip(1, False, images, targets, batch.indices, 1.0)

    try:
        common.run_timed(
            benchmark,
            replay,
            quick,
            BUDGET,
            kernel="skipped_step_replay",
            provider=fault,
            mode="replay",
            dtype=DTYPE_NAMES[trainer.amp_dtype or torch.float32],
            x=64,
        )
    finally:
        trainer.close()
