"""The ``metrics.jsonl`` schema: records written by the Reporter read back by the report as
built, in the documented order, and the trainer's records laid out by the schema."""

from __future__ import annotations

import io
import json
import math

import pytest

from stable_dfl.report import Status, judge_run, load_run
from stable_dfl.train import Trainer
from stable_dfl.train.records import (
    METRICS_NAME,
    EpochRecord,
    ResumeRecord,
    StepRecord,
    ValRecord,
)
from stable_dfl.train.reporting import Reporter

from ..support.records import healthy_step
from ..support.runs import CPU, tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

LOSSES = {"cls_loss": 0.5, "iou_loss": 0.9, "dfl_loss": 2.7, "total_loss": 4.0}
RESULTS = {"standard/map50": 0.25, "standard/map": 0.125}
BAD_PARAMETER = "fpn.lateral.0.0.weight"
RUN_ID = "0123456789ab"


def _step(step: int, **fields) -> StepRecord:
    values = dict(
        losses=LOSSES, grad_norm=2.0, clip_coef=0.25, clip_norm=0.5, lr=1e-4, images_per_s=250.5
    )
    return healthy_step(step, **{**values, **fields})


def _write(run, records) -> None:
    reporter = Reporter(run, enabled=True, run_id=RUN_ID, console=io.StringIO())
    for record in records:
        reporter.metrics(record)
    reporter.close()


def _without_time(record: dict) -> dict:
    assert isinstance(record["time"], float) and record["run_id"] == RUN_ID
    return {k: v for k, v in record.items() if k not in ("time", "run_id")}


def test_a_record_is_written_kind_first_with_dict_fields_in_place():
    record = EpochRecord(
        epoch=2, step=8, losses=LOSSES, results=RESULTS, skipped_total=1, epoch_seconds=1.5
    )
    assert list(record.to_json()) == [
        "kind",
        "epoch",
        "step",
        *LOSSES,
        *RESULTS,
        "skipped_total",
        "epoch_seconds",
    ]
    assert record.to_json()["kind"] == "epoch"
    assert ResumeRecord(epoch=1, step=4).to_json() == {"kind": "resume", "epoch": 1, "step": 4}


def test_records_round_trip_through_the_report(tmp_path):
    untrained = ValRecord(epoch=0, step=0, results={**RESULTS, "standard/map50": 0.0})
    steps = [_step(1), _step(2, grad_finite=False, skipped=True, nonfinite_params=[BAD_PARAMETER])]
    steps.append(_step(3, skipped_total=1, grad_norm=math.inf, loss_scale=0.5))
    epoch = EpochRecord(
        epoch=1, step=3, losses=LOSSES, results=RESULTS, skipped_total=1, epoch_seconds=0.5
    )
    resumed = ResumeRecord(epoch=1, step=3)
    _write(tmp_path, [untrained, *steps, epoch, resumed])

    run = load_run(tmp_path)
    assert run.path == tmp_path / METRICS_NAME and run.malformed == []
    read_steps = [_without_time(r) for r in run.steps]
    assert read_steps == [s.to_json() for s in steps]
    assert all(list(r) == list(s.to_json()) for r, s in zip(read_steps, steps, strict=True))
    assert [_without_time(r) for r in run.evaluations] == [untrained.to_json(), epoch.to_json()]
    assert run.clip_norm == 0.5 and run.series("grad_norm")[2] == math.inf
    assert run.post_clip_norms()[:2] == [0.5, 0.5]

    checks = {check.name: check for check in judge_run(run)}
    assert checks["nan_inf_gradients"].values["parameters"] == [BAD_PARAMETER]
    assert checks["skipped_steps"].values["count"] == 1
    assert checks["loss_scale"].values == {"first": 1.0, "min": 0.5, "final": 0.5, "backoffs": 1}
    assert checks["val_map"].status is Status.PASS
    assert checks["val_map"].values["untrained"] == 0.0


def test_the_trainer_writes_records_laid_out_by_the_schema(tmp_path):
    Trainer(tiny_config(tmp_path, epochs=1), CPU, console=io.StringIO()).fit()
    lines = [json.loads(line) for line in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["val", "step", "step", "epoch"]
    val, step, _, epoch = lines
    results = {k: v for k, v in val.items() if "/" in k}
    assert list(val) == ["time", "run_id", *ValRecord(epoch=0, step=0, results=results).to_json()]
    losses = {k: v for k, v in step.items() if "_loss" in k}
    assert list(step) == ["time", "run_id", *_step(1, losses=losses).to_json()]
    assert list(epoch) == [
        "time",
        "run_id",
        *EpochRecord(
            epoch=1, step=2, losses=losses, results=results, skipped_total=0, epoch_seconds=0.0
        ).to_json(),
    ]
