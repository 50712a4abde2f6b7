"""The trainer explains its skipped steps: planted faults in a real run are attributed in
``forensics/step_<k>.json``, the log and the step records; the run itself is bit-identical
to one without forensics, and steps that are taken run no replay."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stable_dfl.report.cli import main as report_main
from stable_dfl.train import Trainer
from stable_dfl.train import forensics as train_forensics

from ..support.runs import CPU, assert_bit_identical, records, tiny_config, training_state

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

#: 4 batches of 4 images of 64 px (BatchNorm runs on one image: the bisection can single
#: one out).
RUN = dict(train_images=16, image_size=64, epochs=1)


def _plant_nan_pixels(trainer: Trainer, dataset_indices: set[int]) -> None:
    """The images of these dataset indices get a NaN pixel in every batch they are in."""
    collate = trainer.train_loader.collate_fn

    def planting(samples):
        batch = collate(samples)
        for position, index in enumerate(batch.indices.tolist()):
            if index in dataset_indices:
                batch.images[position, 0, 3, 4] = math.nan
        return batch

    trainer.train_loader.collate_fn = planting


def _step_of(trainer_dir, dataset_index: int) -> int:
    """The step whose explanation lists ``dataset_index`` among its images."""
    for path in sorted((trainer_dir / "forensics").glob("step_*.json")):
        explanation = json.loads(path.read_text())
        if any(image["dataset_index"] == dataset_index for image in explanation["images"]):
            return explanation["step"]
    raise AssertionError(f"no explanation lists image {dataset_index}")


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_a_nan_image_is_explained_in_the_file_the_record_and_the_log(tmp_path, amp):
    trainer = Trainer(tiny_config(tmp_path, amp=amp, **RUN), CPU)
    _plant_nan_pixels(trainer, {6})
    trainer.fit()
    step = _step_of(tmp_path, 6)
    explanation = json.loads((tmp_path / f"forensics/step_{step}.json").read_text())
    assert explanation["origin"]["stage"] == "input"
    assert explanation["origin"]["verdict"] == "data"
    position = explanation["reproduced_by"][0]
    image = explanation["images"][position]
    assert explanation["reproduced_by"] == [position]
    assert (image["dataset_index"], image["name"]) == (6, "synthetic train image 6")
    assert image["nonfinite_pixels"] == 1

    record = records(tmp_path, "step")[step - 1]
    assert record["skipped"] and record["forensics"] == f"forensics/step_{step}.json"
    log = (tmp_path / "training_debug.log").read_text()
    assert f"NaN/Inf origin (batch {step}): the input holds NaN/Inf: image {position}" in log
    # The epoch means are over the steps taken: the skipped step's NaN is not in them.
    assert all(
        math.isfinite(v) for k, v in records(tmp_path, "epoch")[0].items() if k.endswith("loss")
    )


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_the_run_is_bit_identical_with_and_without_forensics(tmp_path, amp):
    finals, steps = [], []
    for forensics_steps in (0, 3):
        save_dir = tmp_path / f"forensics_{forensics_steps}"
        options = {**RUN, "epochs": 2, "amp": amp, "forensics_steps": forensics_steps}
        config = tiny_config(save_dir, **options)
        trainer = Trainer(config, CPU)
        _plant_nan_pixels(trainer, {2, 9})
        trainer.fit()
        finals.append({**training_state(trainer), "scaler": trainer.scaler.state_dict()})
        steps.append(
            [
                {
                    k: v
                    for k, v in r.items()
                    if k not in ("time", "run_id", "images_per_s", "forensics")
                }
                for r in records(save_dir, "step")
            ]
        )
    assert_bit_identical(finals[0], finals[1])
    assert json.dumps(steps[0]) == json.dumps(steps[1])
    # Two NaN images, two epochs: 4 skips, the first 3 explained (fp16 also skips while its
    # scale comes down, at steps that depend on the CPU's rounding).
    skips = sum(r["skipped"] for r in steps[0])
    assert skips == 4 or (amp == "fp16" and skips > 4)
    assert not (tmp_path / "forensics_0" / "forensics").exists()
    assert len(list((tmp_path / "forensics_3" / "forensics").glob("*.json"))) == 3


def test_at_most_forensics_steps_are_replayed(tmp_path):
    config = tiny_config(tmp_path, forensics_steps=1, max_consecutive_skips=0, **RUN)
    trainer = Trainer(config, CPU)
    _plant_nan_pixels(trainer, set(range(16)))  # every step is skipped
    trainer.fit()
    steps = records(tmp_path, "step")
    assert [r["forensics"] for r in steps] == ["forensics/step_1.json"] + [None] * (len(steps) - 1)
    assert [p.name for p in (tmp_path / "forensics").iterdir()] == ["step_1.json"]


def test_loss_scale_calibration_is_explained_once(tmp_path):
    """An initial scale far too high: the first steps all overflow while the GradScaler
    halves it; the first is replayed and the rest of that run of skips is not."""
    trainer = Trainer(tiny_config(tmp_path, amp="fp16", max_consecutive_skips=0, **RUN), CPU)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    replays = []
    explain = train_forensics.explain_step

    def counted(*args, **kwargs):
        replays.append(kwargs["step"])
        return explain(*args, **kwargs)

    train_forensics.explain_step = counted
    try:
        trainer.fit()
    finally:
        train_forensics.explain_step = explain
    steps = records(tmp_path, "step")
    assert all(r["skipped"] for r in steps), "2**40 halves to 2**36 in four steps"
    assert replays == [1]
    first = json.loads((tmp_path / "forensics/step_1.json").read_text())
    assert first["origin"]["cause"] == "loss-scale overflow"
    assert first["loss_scale"] == 2.0**40
    assert [r["forensics"] for r in steps] == ["forensics/step_1.json"] * len(steps)
    log = (tmp_path / "training_debug.log").read_text()
    assert "NaN/Inf origin (batch 2): fp16 loss-scale calibration, as explained at batch 1" in log


def test_taken_steps_run_no_replay(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a replay ran for a step that was taken")

    monkeypatch.setattr(train_forensics, "explain_step", refuse)
    Trainer(tiny_config(tmp_path, **RUN), CPU).fit()
    assert not any(r["skipped"] for r in records(tmp_path, "step"))
    assert not (tmp_path / "forensics").exists()


def test_a_failing_replay_is_logged_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the model cannot run twice")

    monkeypatch.setattr(train_forensics, "explain_step", broken)
    trainer = Trainer(tiny_config(tmp_path, **RUN), CPU)
    _plant_nan_pixels(trainer, {0})
    trainer.fit()
    log = (tmp_path / "training_debug.log").read_text()
    assert "not found, the replay failed (RuntimeError: the model cannot run twice)" in log
    assert len(records(tmp_path, "step")) == 4


def test_the_report_lists_the_explained_steps(tmp_path, capsys):
    trainer = Trainer(tiny_config(tmp_path, **RUN), CPU)
    _plant_nan_pixels(trainer, {6})
    trainer.fit()
    step = _step_of(tmp_path, 6)
    report_main([str(tmp_path), "--no_plots", "--settle_steps", "1", "--window", "2"])
    out = capsys.readouterr().out
    assert "why steps went non-finite:" in out
    assert f"  step {step}: the input holds NaN/Inf: image " in out
    assert "verdict: data" in out
    report_main([str(tmp_path), "--no_plots", "--json"])
    document = json.loads(capsys.readouterr().out)
    (explained,) = document["runs"][0]["explained_steps"]
    assert explained["steps"] == [step] and explained["stage"] == "input"
