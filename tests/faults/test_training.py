"""Training under injected faults: NaN/Inf gradients, NaN logits and losses, an absurd
learning rate. A bad step is skipped without a trace, the log names the culprit, training
goes on, and a run that cannot recover stops with an explanation and an intact checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from stable_dfl.train import (
    Trainer,
    TrainingDivergedError,
    load_checkpoint,
    parse_config,
    save_checkpoint,
)
from stable_dfl.train.cli import main as train_main

from ..support.runs import (
    CPU,
    assert_bit_identical,
    cli_args,
    records,
    tiny_config,
    training_state,
)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

NAN, INF = float("nan"), float("inf")
#: The parameter whose gradient is poisoned, and the steps (batches, from 1) that get which value.
POISONED = "standard_head.cls_branch.2.weight"
FAULTS = {3: NAN, 6: INF}
#: 8 batches per epoch, 3 epochs, a learning rate at which the DFL loss falls fast.
CONVERGENCE_RUN = dict(train_images=32, epochs=3, lr=1e-2)
STEPS = 24


def _poison_gradient(trainer: Trainer, faults: dict[int, float]) -> None:
    """Sets one element of POISONED's gradient to faults[step] at those steps."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if trainer.step not in faults:
            return grad
        grad = grad.clone()
        grad.view(-1)[-1] = faults[trainer.step]
        return grad

    dict(trainer.model.named_parameters())[POISONED].register_hook(hook)


def _record_state_before_each_step(trainer: Trainer) -> dict[int, dict]:
    """{step: state before its forward pass (buffers and the GradScaler's state too)}; the
    replays of a skipped step's explanation run the forward again, after the step."""
    before: dict[int, dict] = {}

    def pre_forward(_module, _inputs):
        if trainer.model.training and trainer.step not in before:
            before[trainer.step] = _state(trainer)

    trainer.model.register_forward_pre_hook(pre_forward)
    return before


def _state(trainer: Trainer) -> dict:
    return {**training_state(trainer), "scaler": trainer.scaler.state_dict()}


def _record_offenders(trainer: Trainer) -> dict[int, list[str]]:
    """{step: every parameter whose gradient the guard found NaN/Inf}; the metrics keep the
    first few only."""
    offenders: dict[int, list[str]] = {}
    guard_step = trainer.guard.step

    def step(*args, **kwargs):
        result = guard_step(*args, **kwargs)
        offenders[trainer.step] = result.offenders
        return result

    trainer.guard.step = step
    return offenders


def _after_a_skip(state: dict) -> dict:
    """``state`` as a skipped step must leave it: unchanged, but for an enabled GradScaler,
    whose scale backs off and whose count of steps towards the next growth starts over."""
    scaler = state["scaler"]
    if scaler:
        scaler = {
            **scaler,
            "scale": scaler["scale"] * scaler["backoff_factor"],
            "_growth_tracker": 0,
        }
    return {**state, "scaler": scaler}


@pytest.mark.parametrize("amp", ["fp16", "bf16", "off"])
def test_nan_and_inf_gradients_are_skipped_without_a_trace(tmp_path, amp):
    trainer = Trainer(tiny_config(tmp_path, amp=amp, **CONVERGENCE_RUN), CPU)
    _poison_gradient(trainer, FAULTS)
    before = _record_state_before_each_step(trainer)
    offenders = _record_offenders(trainer)
    trainer.fit()
    before[STEPS + 1] = _state(trainer)  # validation and checkpoints change none of it

    steps = records(tmp_path, "step")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)), "the run goes on"
    skipped = [r["step"] for r in steps if r["skipped"]]
    assert set(FAULTS) <= set(skipped)
    for step in FAULTS:
        assert POISONED in offenders[step]
    # fp16 also skips steps of its own: the GradScaler overflows while its scale comes down
    # from 65536, at steps that depend on the CPU's rounding. bf16 and fp32 never overflow.
    log = (tmp_path / "training_debug.log").read_text()
    if amp != "fp16":
        assert skipped == sorted(FAULTS)
        assert all(offenders[step] == [POISONED] for step in FAULTS)
        assert log.count(f"⚠️ NaN/Inf gradient in {POISONED}\n") == len(FAULTS)
    for step in skipped:
        assert not steps[step - 1]["grad_finite"]
        # Parameters, BatchNorm statistics, optimizer state, EMA and the GradScaler: as
        # before the step (the scale backed off), bit for bit.
        assert_bit_identical(before[step + 1], _after_a_skip(before[step]), f"step {step}")
    for step in skipped:
        assert f"Skipping optimizer step (batch {step}," in log
    assert trainer.skipped_steps == len(skipped)
    assert trainer.ema.updates == STEPS - len(skipped)

    # The run learns through the skips. The DFL loss is the component that falls steadily
    # here (the class loss rises while its IoU-valued targets grow); the last epoch's mean
    # ends at 0.3-0.5x the first step's on the CPUs tried, whatever the SIMD level.
    assert not all(r["skipped"] for r in steps[max(FAULTS) :])
    first_dfl = steps[0]["dfl_loss"]
    assert records(tmp_path, "epoch")[-1]["dfl_loss"] < 0.7 * first_dfl


def _nan_logits_at(trainer: Trainer, steps: set[int]) -> None:
    """Makes one DFL logit of the standard head NaN in the forward passes of ``steps``."""

    def hook(_module, _inputs, output):
        if trainer.model.training and trainer.step in steps:
            output = output.clone()
            output[0, 0, 0, 0] = NAN
            return output
        return output

    trainer.model.standard_head.box_branch.register_forward_hook(hook)


def _nan_loss_at(trainer: Trainer, steps: set[int]) -> None:
    criterion = trainer.criterion

    def poisoned(output, targets):
        loss, components = criterion(output, targets)
        return (loss * NAN, components) if trainer.step in steps else (loss, components)

    trainer.criterion = poisoned


@pytest.mark.parametrize("inject", [_nan_logits_at, _nan_loss_at], ids=["logits", "loss"])
def test_nan_logits_or_loss_skip_the_step_and_training_goes_on(tmp_path, inject):
    trainer = Trainer(tiny_config(tmp_path, epochs=2), CPU)
    inject(trainer, {2})
    before = _record_state_before_each_step(trainer)
    trainer.fit()
    steps = records(tmp_path, "step")
    assert [r["skipped"] for r in steps] == [False, True, False, False]
    assert math.isnan(steps[1]["total_loss"]), "the bad step's loss is reported, not hidden"
    assert_bit_identical(before[3], before[2])  # no GradScaler without fp16
    log = (tmp_path / "training_debug.log").read_text()
    assert "⚠️ NaN/Inf gradient in backbone.stem.0.weight" in log
    assert "Skipping optimizer step (batch 2," in log
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4  # finite, loadable


def test_epoch_means_are_over_the_steps_taken(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, train_images=16), CPU)  # 4 batches
    _nan_loss_at(trainer, {2})
    trainer.fit()
    steps = records(tmp_path, "step")
    (epoch,) = records(tmp_path, "epoch")
    taken = [r for r in steps if not r["skipped"]]
    assert len(taken) == 3 and epoch["skipped_total"] == 1
    for name in ("total_loss", "dfl_loss", "cls_loss", "iou_loss"):
        assert math.isfinite(epoch[name]), f"a recovered run's epoch {name} must not read NaN"
        assert epoch[name] == pytest.approx(sum(r[name] for r in taken) / 3, rel=1e-12)
    log = (tmp_path / "training_debug.log").read_text()
    assert "Epoch 1/1: " in log and "total_loss=nan" not in log and "skipped steps=1" in log


def test_consecutive_skips_stop_the_run_and_keep_the_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, epochs=5, max_consecutive_skips=3), CPU)
    _nan_loss_at(trainer, set(range(3, 100)))
    with pytest.raises(TrainingDivergedError, match=r"last 3 optimizer steps \(up to batch 5\)"):
        trainer.fit()
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["consecutive_skips"] == 2
    # Every step since the checkpoint was skipped: it still holds the current weights.
    assert_bit_identical(checkpoint["model"], trainer.model.state_dict())
    log = (tmp_path / "training_debug.log").read_text()
    assert "Stopping: the last 3 optimizer steps" in log and "last.pt (epoch 2) is left" in log


def test_an_unbounded_run_of_skips_is_allowed_with_zero(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, epochs=3, max_consecutive_skips=0), CPU)
    _nan_loss_at(trainer, set(range(1, 100)))
    trainer.fit()
    assert trainer.skipped_steps == 6 and trainer.ema.updates == 0


def test_absurd_learning_rate_stops_with_exit_code_3(tmp_path, capsys):
    # The first step multiplies the weights up to ~1e30; every later forward pass overflows.
    code = train_main([*cli_args(tmp_path, epochs=4, lr=1e30, max_consecutive_skips=3)])
    assert code == 3
    error = capsys.readouterr().err
    assert error.startswith("error: Stopping: the last 3 optimizer steps") and "--lr" in error
    assert "Traceback" not in error
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


def test_weights_that_overflow_are_never_written_over_a_checkpoint(tmp_path):
    # An optimizer update that overflows: finite gradients, an Inf weight after the step.
    save_checkpoint({"model": {"w": torch.ones(1)}}, tmp_path / "last.pt")
    planted = (tmp_path / "last.pt").read_bytes()
    trainer = Trainer(tiny_config(tmp_path, epochs=2, max_consecutive_skips=0), CPU)
    weight = trainer.model.prototype_head.prototypes

    def overflow(_optimizer, _args, _kwargs):
        if trainer.step == 1:
            with torch.no_grad():
                weight[0, 0] = INF

    trainer.optimizer.register_step_post_hook(overflow)
    with pytest.raises(
        TrainingDivergedError, match=r"model weights are not finite.*not overwritten"
    ):
        trainer.fit()
    assert (tmp_path / "last.pt").read_bytes() == planted
    assert not (tmp_path / "best.pt").exists()


@pytest.mark.parametrize("lr", ["nan", "inf", "1e39", "0", "-1"])
def test_learning_rates_that_cannot_work_are_refused_up_front(lr, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--lr", lr])
    assert "--lr must be > 0 and <= 3.40282e+38" in capsys.readouterr().err
