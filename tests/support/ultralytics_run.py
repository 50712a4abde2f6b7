"""One run of ultralytics' own trainer on a YOLO-format set, offline, for the integration test:

    python -m tests.support.ultralytics_run DATA_YAML RUN_DIR {patched,unpatched}

Prints one JSON object: the per-epoch losses of ``results.csv``, how often ultralytics' own
``DFLoss`` and ours were called, and every attempt to reach the network (each refused). A
process of its own, because the trainer sets process-wide state (deterministic algorithms,
threads, seeds) that must not leak into other tests.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

from tests.support.network import refuse_network

LOSS_COLUMNS = (
    "train/box_loss",
    "train/cls_loss",
    "train/dfl_loss",
    "val/box_loss",
    "val/cls_loss",
    "val/dfl_loss",
)


def _count_calls(cls: type, counts: dict[str, int], key: str) -> None:
    original = cls.__call__

    def counted(self, *args, **kwargs):
        counts[key] += 1
        return original(self, *args, **kwargs)

    cls.__call__ = counted


def main(data_yaml: str, run_dir: str, mode: str) -> dict:
    os.environ["YOLO_OFFLINE"] = "1"
    attempts: list = []
    refuse_network(attempts)
    from ultralytics import YOLO
    from ultralytics.utils import loss as ultralytics_loss

    from stable_dfl.integrations import ultralytics as stable_ultralytics

    counts = {"ultralytics_dfl": 0, "stable_dfl": 0}
    _count_calls(ultralytics_loss.DFLoss, counts, "ultralytics_dfl")
    _count_calls(stable_ultralytics.DFLoss, counts, "stable_dfl")
    if mode == "patched":
        stable_ultralytics.patch()
    YOLO("yolov8n.yaml").train(
        data=data_yaml,
        epochs=3,
        imgsz=96,
        batch=8,
        workers=0,
        device="cpu",
        amp=False,
        plots=False,
        project=str(Path(run_dir).parent),
        name=Path(run_dir).name,
        exist_ok=True,
        verbose=False,
        seed=0,
        deterministic=True,
    )
    with open(Path(run_dir) / "results.csv") as file:
        rows = list(csv.DictReader(file))
    losses = [{c: float(row[c]) for c in LOSS_COLUMNS} for row in rows]
    return {"losses": losses, "calls": counts, "network_attempts": [name for name, _ in attempts]}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
