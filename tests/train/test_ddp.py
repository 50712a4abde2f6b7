"""Two CPU processes under DDP (gloo), as torchrun would start them."""

import json
import os
import socket

import torch
import torch.multiprocessing as mp

from stable_dfl.train import Trainer, init_distributed
from stable_dfl.train.distributed import shutdown_distributed

from ..support.runs import tiny_config

WORLD_SIZE = 2
NAN_STEP = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, save_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
    )
    torch.set_num_threads(1)
    context = init_distributed("cpu")
    try:
        trainer = Trainer(tiny_config(save_dir, train_images=32, batch_size=8, epochs=2), context)
        if (
            rank == 1
        ):  # a NaN on one rank only: DDP's all-reduce spreads it, so both ranks must skip
            weight = trainer.model.standard_head.box_branch[-1].weight
            weight.register_hook(
                lambda grad: grad * float("nan") if trainer.step == NAN_STEP else grad
            )
        trainer.fit()
        torch.save(
            {
                "parameters": dict(trainer.model.named_parameters()),
                "skipped": trainer.skipped_steps,
                "steps": trainer.step,
            },
            os.path.join(save_dir, f"rank{rank}.pt"),
        )
    finally:
        shutdown_distributed()


def test_two_process_ddp_run(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    # 32 images, 2 ranks, batches of 8: 2 steps per epoch per rank.
    assert [r["steps"] for r in ranks] == [4, 4]
    assert [r["skipped"] for r in ranks] == [1, 1]
    # Same parameters on both ranks (BatchNorm running statistics are per rank; DDP
    # broadcasts rank 0's at each forward, and rank 0's are the ones saved).
    for name, value in ranks[0]["parameters"].items():
        assert torch.equal(value, ranks[1]["parameters"][name]), name
    # Rank 0 alone logs and checkpoints.
    log = (tmp_path / "training_debug.log").read_text()
    assert "x2" in log and log.count("Skipping optimizer step") == 1
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in steps if r["kind"] == "step"] == [False, True, False, False]
    assert (tmp_path / "last.pt").exists()
    # Each rank replayed its own shard of the skipped step; rank 1's, where the NaN was made,
    # is the explanation rank 0 wrote.
    explanation = json.loads((tmp_path / f"forensics/step_{NAN_STEP}.json").read_text())
    origin = explanation["origin"]
    assert origin["stage"] == "backward" and origin["gradient_kind"] == "parameter"
    assert origin["where"].startswith("standard_head.box_branch.") and origin["where"].endswith(
        ".weight"
    )
    assert f"NaN/Inf origin (batch {NAN_STEP}): gradient of {origin['where']}" in log
