"""``python -m stable_dfl report``: verdicts on synthetic metrics files, exit codes, plots."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from stable_dfl.__main__ import main
from stable_dfl.report import Status, judge_run, load_run
from stable_dfl.train.records import METRICS_NAME, EpochRecord, ValRecord

from ..support.records import healthy_step

CLIP = 0.5
BAD_PARAMETER = "standard_head.box_branch.2.weight"


def step_record(step: int, dfl: float = 3.0, pre_clip: float = 0.8, **overrides) -> dict:
    """A healthy step record, built by the schema; ``overrides`` replace fields or losses."""
    losses = {
        "cls_loss": 1.0,
        "iou_loss": 0.5,
        "dfl_loss": dfl,
        "total_loss": 1.0 + 2.5 * 0.5 + 0.5 * dfl,
    }
    losses.update({name: overrides.pop(name) for name in [*overrides] if name in losses})
    record = healthy_step(
        step,
        losses=losses,
        grad_norm=pre_clip,
        clip_coef=min(1.0, CLIP / (pre_clip + 1e-6)),
        clip_norm=CLIP,
        lr=3e-5,
        images_per_s=100.0,
    )
    return dataclasses.replace(record, **overrides).to_json()


def write_run(path, records, maps=(0.0, 0.2)) -> None:
    path.mkdir(parents=True, exist_ok=True)
    untrained = ValRecord(epoch=0, step=0, results={"standard/map50": maps[0], "standard/map": 0.0})
    trained = EpochRecord(
        epoch=1,
        step=len(records),
        losses={},
        results={"standard/map50": maps[1], "standard/map": 0.1},
        skipped_total=0,
        epoch_seconds=1.0,
    )
    lines = [json.dumps(r) for r in [untrained.to_json(), *records, trained.to_json()]]
    (path / METRICS_NAME).write_text("\n".join(lines) + "\n")


def healthy_records(n: int = 120) -> list[dict]:
    return [step_record(s, dfl=3.0 - s / n) for s in range(1, n + 1)]


def statuses(run_dir) -> dict[str, Status]:
    return {check.name: check.status for check in judge_run(load_run(run_dir))}


def test_healthy_run_passes_and_writes_a_plot(tmp_path, capsys):
    write_run(tmp_path / "run", healthy_records())
    assert set(statuses(tmp_path / "run").values()) <= {Status.PASS, Status.NOT_APPLICABLE}
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "HEALTHY" in capsys.readouterr().out
    plot = tmp_path / "run" / "report" / "training_health.png"
    assert plot.stat().st_size > 10_000


def test_nan_at_step_k_fails_and_names_the_parameter(tmp_path):
    records = healthy_records()
    records[69] = step_record(
        70,
        grad_finite=False,
        skipped=True,
        nonfinite_params=[BAD_PARAMETER],
        total_loss=math.nan,
        dfl_loss=math.nan,
    )
    write_run(tmp_path / "run", records)
    checks = {c.name: c for c in judge_run(load_run(tmp_path / "run"))}
    assert checks["nan_inf_gradients"].status is Status.FAIL
    assert checks["nan_inf_gradients"].values["first_step"] == 70
    assert checks["nan_inf_gradients"].values["parameters"] == [BAD_PARAMETER]
    assert checks["losses_finite"].status is Status.FAIL
    assert checks["skipped_steps"].status is Status.FAIL
    assert main(["report", str(tmp_path / "run"), "--no_plots"]) == 1


def test_applied_nan_step_without_guard_fails_skipped_check(tmp_path):
    records = healthy_records()
    records[9] = step_record(10, grad_finite=False, grad_norm=math.nan)
    write_run(tmp_path / "run", records)
    checks = {c.name: c for c in judge_run(load_run(tmp_path / "run"))}
    assert checks["skipped_steps"].status is Status.FAIL
    assert checks["skipped_steps"].values["nonfinite_steps_applied"] == 1


def test_fp16_loss_scale_calibration_is_not_a_failure(tmp_path):
    records = healthy_records()
    for step, scale in ((1, 32768.0), (2, 16384.0), (3, 8192.0)):
        records[step - 1] = step_record(step, grad_finite=False, skipped=True, loss_scale=scale)
    for record in records[3:]:
        record["loss_scale"] = 8192.0
    write_run(tmp_path / "run", records)
    result = statuses(tmp_path / "run")
    assert result["nan_inf_gradients"] is Status.PASS
    assert result["skipped_steps"] is Status.PASS
    assert result["loss_scale"] is Status.PASS


def test_high_dfl_fails(tmp_path):
    write_run(tmp_path / "run", [step_record(s, dfl=8.5) for s in range(1, 121)])
    assert statuses(tmp_path / "run")["dfl_loss"] is Status.FAIL


def test_exploding_pre_clip_norm_fails_though_post_clip_is_bounded(tmp_path):
    records = [step_record(s, pre_clip=0.3 * 1.1 ** (s - 50)) for s in range(1, 121)]
    write_run(tmp_path / "run", records)
    check = next(c for c in judge_run(load_run(tmp_path / "run")) if c.name == "grad_norm")
    assert check.status is Status.FAIL
    assert check.values["post_clip_max"] <= CLIP + 1e-6
    assert check.values["pre_clip_growth"] > 10


def test_running_run_with_a_partial_last_line(tmp_path):
    write_run(tmp_path / "run", healthy_records(30))
    with open(tmp_path / "run" / "metrics.jsonl", "a") as file:
        file.write('{"kind": "step", "step": 31, "dfl_lo')
    run = load_run(tmp_path / "run")
    assert len(run.steps) == 30 and run.malformed == []
    result = statuses(tmp_path / "run")
    assert result["dfl_loss"] is Status.PENDING  # fewer than the 50 settling steps
    assert main(["report", str(tmp_path / "run"), "--no_plots"]) == 0


def test_missing_metrics_cannot_be_judged(tmp_path):
    assert main(["report", str(tmp_path), "--no_plots"]) == 2


def test_compare_overlays_two_runs(tmp_path, capsys):
    write_run(tmp_path / "good", healthy_records())
    write_run(tmp_path / "bad", [step_record(s, dfl=8.5) for s in range(1, 121)])
    code = main(["report", "--compare", str(tmp_path / "good"), str(tmp_path / "bad"), "--json"])
    document = json.loads(capsys.readouterr().out)
    assert code == 1 and document["healthy"] is False
    assert [run["healthy"] for run in document["runs"]] == [True, False]
    (plot,) = document["plots"]
    assert (tmp_path / "good" / "report" / "compare_good_vs_bad.png").stat().st_size > 10_000
    assert plot.endswith("compare_good_vs_bad.png")


def test_report_reads_a_real_training_run(tmp_path):
    import io

    import torch

    from stable_dfl.train import Trainer
    from stable_dfl.train.distributed import DistContext

    from ..support.runs import tiny_config

    config = tiny_config(tmp_path, train_images=12)
    Trainer(config, DistContext(0, 1, torch.device("cpu")), console=io.StringIO()).fit()
    run = load_run(tmp_path)
    assert len(run.steps) == 3 and run.clip_norm == config.gradient_clip_norm
    assert all(r["grad_finite"] and r["nonfinite_params"] == [] for r in run.steps)
    assert len(run.evaluations) == 2
    assert main(["report", str(tmp_path), "--no_plots"]) == 0


@pytest.mark.parametrize("argv", [["report"], ["report", "a", "--compare", "a", "b"]])
def test_run_xor_compare(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
