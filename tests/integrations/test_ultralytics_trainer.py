"""ultralytics' own trainer (``YOLO('yolov8n.yaml').train(...)``) on a tiny YOLO-format set
written by ``stable_dfl.data``, patched and unpatched, offline: inside the trainer the patch
takes effect (ultralytics' ``DFLoss`` is never called, ours is) and the per-epoch losses match."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stable_dfl.data import SHAPE_CLASSES, SyntheticShapes, write_yolo_dataset

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # two 3-epoch trainings: about 20 s on 2 CPU cores


def _train(data_yaml: Path, run_dir: Path, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tests.support.ultralytics_run", str(data_yaml), str(run_dir), mode],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_patched_trainer_uses_our_loss_and_matches_unpatched_per_epoch(tmp_path):
    pytest.importorskip("ultralytics")
    pytest.importorskip("polars", reason="ultralytics' trainer writes its results with polars")
    data = tmp_path / "data"
    for split, count in (("train", 32), ("val", 8)):
        write_yolo_dataset(
            SyntheticShapes(count, 96, split, seed=0), data, split, SHAPE_CLASSES, "png"
        )
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(
        f"path: {data}\ntrain: images/train\nval: images/val\nnames: {list(SHAPE_CLASSES)}\n"
    )
    unpatched = _train(data_yaml, tmp_path / "runs" / "unpatched", "unpatched")
    patched = _train(data_yaml, tmp_path / "runs" / "patched", "patched")

    assert unpatched["calls"]["ultralytics_dfl"] > 0 and unpatched["calls"]["stable_dfl"] == 0
    assert patched["calls"]["ultralytics_dfl"] == 0, "the patch must reach the trainer's loss"
    assert patched["calls"]["stable_dfl"] > 0
    assert len(patched["losses"]) == len(unpatched["losses"]) == 3
    for ours, theirs in zip(patched["losses"], unpatched["losses"], strict=True):
        for column, value in theirs.items():
            assert ours[column] == pytest.approx(value, rel=2e-5, abs=2e-5), column
    assert patched["network_attempts"] == unpatched["network_attempts"] == []
