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

from .fault_helpers import (
    CPU,
    assert_bit_identical,
    cli_args,
    fast_config,
    records,
    training_state,
)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

NAN, INF = float("nan"), float("inf")
#: The parameter whose gradient is poisoned, and the steps (batches, from 1) that get which value.
POISONED = "standard_head.cls_branch.2.weight"
FAULTS = {3: NAN, 6: INF}
#: 8 batches per epoch, 3 epochs, a learning rate that more than halves the DFL loss in 24 steps.
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
    """{step: state before its forward pass (buffers too), and the loss scale}."""
    before: dict[int, dict] = {}

    def pre_forward(_module, _inputs):
        if trainer.model.training:
            before[trainer.step] = {
                **training_state(trainer),
                "scale": trainer.scaler.get_scale() if trainer.scaler.is_enabled() else None,
            }

    trainer.model.register_forward_pre_hook(pre_forward)
    return before


@pytest.mark.parametrize("amp", ["fp16", "bf16", "off"])
def test_nan_and_inf_gradients_are_skipped_without_a_trace(tmp_path, amp):
    clean = Trainer(fast_config(tmp_path / "clean", amp=amp, **CONVERGENCE_RUN), CPU)
    clean.fit()
    trainer = Trainer(fast_config(tmp_path / "faulty", amp=amp, **CONVERGENCE_RUN), CPU)
    _poison_gradient(trainer, FAULTS)
    before = _record_state_before_each_step(trainer)
    trainer.fit()

    steps = records(tmp_path / "faulty", "step")
    assert [r["step"] for r in steps if r["skipped"]] == sorted(FAULTS)
    for step in FAULTS:
        # Parameters, BatchNorm statistics, optimizer state and EMA: as before the step.
        after = {k: v for k, v in before[step + 1].items() if k != "scale"}
        assert_bit_identical(after, {k: v for k, v in before[step].items() if k != "scale"})
        if amp == "fp16":
            assert before[step + 1]["scale"] == before[step]["scale"] / 2, "the scale backs off"
    log = (tmp_path / "faulty" / "training_debug.log").read_text()
    assert log.count(f"⚠️ NaN/Inf gradient in {POISONED}\n") == len(FAULTS)
    for step in FAULTS:
        assert f"Skipping optimizer step (batch {step}," in log
    assert trainer.skipped_steps == len(FAULTS) and trainer.ema.updates == STEPS - len(FAULTS)

    # Up to the first fault both runs are the same computation, bit for bit...
    clean_steps = records(tmp_path / "clean", "step")
    first_fault = min(FAULTS)
    assert [r["total_loss"] for r in steps[: first_fault - 1]] == [
        r["total_loss"] for r in clean_steps[: first_fault - 1]
    ]
    # ...and skipping two of 24 steps costs little. The DFL loss is the component that
    # falls steadily here (the class loss rises while its IoU-valued targets grow).
    start = clean_steps[0]["dfl_loss"]
    clean_end = records(tmp_path / "clean", "epoch")[-1]["dfl_loss"]
    faulty_end = records(tmp_path / "faulty", "epoch")[-1]["dfl_loss"]
    assert clean_end < 0.5 * start and faulty_end < 0.5 * start
    assert faulty_end == pytest.approx(clean_end, rel=0.25)


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
    trainer = Trainer(fast_config(tmp_path, epochs=2), CPU)
    inject(trainer, {2})
    before = _record_state_before_each_step(trainer)
    trainer.fit()
    steps = records(tmp_path, "step")
    assert [r["skipped"] for r in steps] == [False, True, False, False]
    assert math.isnan(steps[1]["total_loss"]), "the bad step's loss is reported, not hidden"
    assert_bit_identical(
        {k: v for k, v in before[3].items() if k != "scale"},
        {k: v for k, v in before[2].items() if k != "scale"},
    )
    log = (tmp_path / "training_debug.log").read_text()
    assert "⚠️ NaN/Inf gradient in backbone.stem.0.weight" in log
    assert "Skipping optimizer step (batch 2," in log
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4  # finite, loadable


def test_consecutive_skips_stop_the_run_and_keep_the_checkpoint(tmp_path):
    trainer = Trainer(fast_config(tmp_path, epochs=5, max_consecutive_skips=3), CPU)
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
    trainer = Trainer(fast_config(tmp_path, epochs=3, max_consecutive_skips=0), CPU)
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
    trainer = Trainer(fast_config(tmp_path, epochs=2, max_consecutive_skips=0), CPU)
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
    assert "--lr must be positive and at most 3.4e+38" in capsys.readouterr().err
