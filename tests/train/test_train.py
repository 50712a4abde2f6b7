import json
import math
import subprocess
import sys

import pytest
import torch

from stable_dfl import GradGuard
from stable_dfl.data import PadToFixedBoxes, SyntheticShapes
from stable_dfl.models import DetectionLoss, DetectionTargets, DualHeadDetector
from stable_dfl.train import (
    DistContext,
    NonFiniteCheckpointError,
    TrainConfig,
    Trainer,
    load_checkpoint,
    parse_config,
    save_checkpoint,
)
from stable_dfl.train.build import build_optimization
from stable_dfl.train.cli import main as train_main
from stable_dfl.train.plain_step import PlainClipStep
from stable_dfl.train.schedule import WarmupCosine
from stable_dfl.train.step import OptimizerStepper, StepOutcome

from ..support.runs import tiny_config

CPU = DistContext(0, 1, torch.device("cpu"))


def _records(save_dir, kind):
    lines = (save_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_a_few_guarded_steps_reduce_the_box_losses():
    data = SyntheticShapes(8, 64, seed=1)
    batch = PadToFixedBoxes(data.max_objects)([data[i] for i in range(8)])
    targets = DetectionTargets(batch.labels, batch.boxes, batch.valid)
    model = DualHeadDetector(5, width=4, fpn_channels=16, embed_dim=8)
    criterion = DetectionLoss(5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    guard = GradGuard(model, max_norm=0.5)
    history = []
    for _ in range(20):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(batch.images)
        loss, components = criterion(output, targets)
        optimizer.zero_grad()
        loss.backward()
        result = guard.step(optimizer, scaler)
        assert result.finite and not result.skipped and result.clip_coef <= 1
        history.append(components)
    # The class loss is not monotonic here: its soft targets are the IoUs, which grow.
    assert history[-1]["dfl_loss"] < 0.6 * history[0]["dfl_loss"]
    assert history[-1]["iou_loss"] < 0.7 * history[0]["iou_loss"]


def test_guard_skips_non_finite_gradients_and_names_them():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 2)).sum().backward()
    model[1].weight.grad[0, 0] = float("nan")
    result = GradGuard(model, max_norm=1.0).step(optimizer, scaler)
    assert result.skipped and not result.finite and result.offenders == ["1.weight"]
    assert math.isfinite(result.total_norm), "the norm covers the finite gradients"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    optimizer.zero_grad()
    (100 * model(torch.ones(1, 2)).sum()).backward()
    result = GradGuard(model, max_norm=1.0).step(optimizer, scaler)
    assert (
        not result.skipped
        and result.total_norm > 1
        and result.clip_coef == pytest.approx(1 / result.total_norm)
    )


@pytest.mark.parametrize(("nan_guard", "stepper_type"), [("on", GradGuard), ("off", PlainClipStep)])
def test_both_optimizer_steps_satisfy_the_step_protocols(nan_guard, stepper_type):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    optimizer, _, scaler, stepper = build_optimization(
        model, TrainConfig(nan_guard=nan_guard), torch.device("cpu"), None, total_steps=10
    )
    assert type(stepper) is stepper_type and isinstance(stepper, OptimizerStepper)
    for poison in (False, True):
        optimizer.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        if poison:
            model[1].weight.grad[0, 0] = math.nan
        outcome = stepper.step(optimizer, scaler)
        assert isinstance(outcome, StepOutcome)
        assert isinstance(outcome.total_norm, float) and isinstance(outcome.clip_coef, float)
        assert outcome.finite is not poison and isinstance(outcome.skipped, bool)
        assert isinstance(outcome.offenders, list)
    # Only the guard skips a NaN step without a GradScaler and names the culprit.
    assert outcome.skipped is (nan_guard == "on")
    assert outcome.offenders == (["1.weight"] if nan_guard == "on" else [])


def test_the_guard_does_not_depend_on_the_trainer():
    code = "import sys, stable_dfl.guard; sys.exit('stable_dfl.train' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_schedule_warms_up_then_decays_to_the_floor():
    schedule = WarmupCosine(total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0) and schedule(55) == pytest.approx(0.55)
    assert schedule(100) == pytest.approx(0.1)


def test_seed_command_line_options_parse():
    config = parse_config(
        ["--lr", "1e-5", "--gradient_clip_norm", "0.25", "--dfl_weight", "0.25", "--amp", "off"]
    )
    assert (config.lr, config.gradient_clip_norm, config.dfl_weight, config.amp) == (
        1e-5,
        0.25,
        0.25,
        "off",
    )
    assert parse_config(["--resume"]).resume == ""
    defaults = parse_config([])
    assert (
        defaults.lr,
        defaults.weight_decay,
        defaults.dfl_weight,
        defaults.gradient_clip_norm,
    ) == (3e-5, 0.005, 0.5, 0.5)


def test_training_run_writes_logs_metrics_and_checkpoints(tmp_path):
    results = Trainer(tiny_config(tmp_path, epochs=2, debug_interval=2), CPU).fit()
    assert set(results) == {"standard/map50", "standard/map", "prototype/map50", "prototype/map"}
    log = (tmp_path / "training_debug.log").read_text()
    for expected in (
        "Batch 1: dfl_loss=",
        "Grad Norm=",
        "Loss components:",
        "  dfl_loss: ",
        "Gradient Norms:",
        "  Total Grad Norm: ",
        "Untrained model:",
        "Epoch 2/2:",
    ):
        assert expected in log
    assert "NaN" not in log and "Skipping" not in log
    steps = _records(tmp_path, "step")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in (
        "dfl_loss",
        "cls_loss",
        "iou_loss",
        "grad_norm",
        "clip_coef",
        "loss_scale",
        "skipped",
        "lr",
        "images_per_s",
    ):
        assert key in steps[0]
    epochs = _records(tmp_path, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2] and "standard/map50" in epochs[-1]
    assert (tmp_path / "last.pt").exists() and (tmp_path / "best.pt").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_non_finite_gradient_skips_the_step_and_the_ema(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, epochs=2), CPU)
    weight = trainer.model.standard_head.cls_branch[-1].weight
    weight.register_hook(lambda grad: grad * float("nan") if trainer.step == 2 else grad)
    trainer.fit()
    log = (tmp_path / "training_debug.log").read_text()
    assert "⚠️ NaN/Inf gradient in standard_head.cls_branch.2.weight" in log
    assert "Skipping optimizer step (batch 2" in log
    assert [r["skipped"] for r in _records(tmp_path, "step")] == [False, True, False, False]
    assert trainer.ema.updates == 3 and trainer.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_resume_continues_exactly(tmp_path):
    Trainer(tiny_config(tmp_path / "full", epochs=2, save_period=1), CPU).fit()
    Trainer(
        tiny_config(tmp_path / "resumed", epochs=2, resume=str(tmp_path / "full" / "epoch1.pt")),
        CPU,
    ).fit()
    full = load_checkpoint(tmp_path / "full" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert full["step"] == resumed["step"] == 4
    for key in ("model", "optimizer", "scheduler", "ema"):
        assert _flatten(full[key]) == pytest.approx(_flatten(resumed[key]), abs=0), key
    log = (tmp_path / "resumed" / "training_debug.log").read_text()
    assert "Resumed from" in log and "Untrained model" not in log


def _flatten(value):
    if isinstance(value, torch.Tensor):
        return value.flatten().double().tolist()
    if isinstance(value, dict):
        return [x for key in sorted(value, key=str) for x in _flatten(value[key])]
    if isinstance(value, list | tuple):
        return [x for item in value for x in _flatten(item)]
    return [value] if isinstance(value, int | float) else []


def test_non_finite_checkpoint_is_refused(tmp_path, capsys):
    Trainer(tiny_config(tmp_path), CPU).fit()
    state = load_checkpoint(tmp_path / "last.pt")
    state["model"]["fpn.lateral.1.0.weight"][0, 0] = float("inf")
    save_checkpoint(state, tmp_path / "exploded.pt")
    with pytest.raises(
        NonFiniteCheckpointError, match=r"'fpn\.lateral\.1\.0\.weight'.*Start fresh"
    ):
        load_checkpoint(tmp_path / "exploded.pt")
    code = train_main(
        ["--save_dir", str(tmp_path), "--resume", str(tmp_path / "exploded.pt"), "--device", "cpu"]
    )
    assert code == 2
    assert "Start fresh" in capsys.readouterr().err


def test_init_from_loads_stage_one_weights(tmp_path):
    Trainer(tiny_config(tmp_path / "stage1"), CPU).fit()
    trainer = Trainer(
        tiny_config(tmp_path / "stage2", init_from=str(tmp_path / "stage1" / "last.pt")), CPU
    )
    stage1 = load_checkpoint(tmp_path / "stage1" / "last.pt")["ema"]["module"]
    assert all(
        torch.equal(value, stage1[name]) for name, value in trainer.model.state_dict().items()
    )
    assert trainer.step == 0
