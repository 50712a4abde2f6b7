"""The layout version of a training checkpoint is checked on load: a checkpoint of another
version is refused with a message that names the file, both versions and what to do; a
bare state_dict, which has no version, still serves ``--init_from``."""

from __future__ import annotations

import pytest
import torch

from stable_dfl.train import CheckpointError, Trainer, load_checkpoint, save_checkpoint
from stable_dfl.train.checkpoint import CHECKPOINT_VERSION
from stable_dfl.train.cli import main as train_main

from ..support.runs import CPU, cli_args, tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

NEWER, OLDER = CHECKPOINT_VERSION + 1, CHECKPOINT_VERSION - 1


@pytest.fixture(scope="module")
def trainer_state(tmp_path_factory) -> dict:
    return Trainer(tiny_config(tmp_path_factory.mktemp("source")), CPU).state_dict()


def _with_version(state: dict, version: int, path) -> None:
    save_checkpoint({**state, "version": version}, path)


def test_a_trainer_checkpoint_holds_the_current_version(trainer_state):
    assert trainer_state["version"] == CHECKPOINT_VERSION


@pytest.mark.parametrize(
    ("version", "origin", "remedy"),
    [
        (NEWER, "a newer stable_dfl", "upgrade stable_dfl to use it"),
        (OLDER, "an older stable_dfl", "start fresh (drop --resume / --init_from)"),
    ],
    ids=["newer", "older"],
)
def test_another_version_is_refused_on_load(tmp_path, trainer_state, version, origin, remedy):
    path = tmp_path / "other.pt"
    _with_version(trainer_state, version, path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: checkpoint version {version}, ")
    assert f"reads version {CHECKPOINT_VERSION} only" in message
    assert origin in message and remedy in message


@pytest.mark.parametrize("option", ["resume", "init_from"])
@pytest.mark.parametrize("version", [NEWER, OLDER], ids=["newer", "older"])
def test_the_command_line_refuses_another_version(tmp_path, trainer_state, capsys, option, version):
    path = tmp_path / "other.pt"
    _with_version(trainer_state, version, path)
    code = train_main(cli_args(tmp_path / "run", **{option: str(path)}))
    error = capsys.readouterr().err
    assert code == 2 and error.startswith(f"error: {path}: checkpoint version {version}, ")
    assert "Traceback" not in error
    assert not (tmp_path / "run" / "last.pt").exists(), "nothing was trained"


def test_a_bare_state_dict_has_no_version_and_serves_init_from(tmp_path, trainer_state):
    path = tmp_path / "weights.pt"
    torch.save(trainer_state["model"], path)
    trainer = Trainer(tiny_config(tmp_path / "run", init_from=str(path)), CPU)
    assert all(
        torch.equal(value, trainer_state["model"][name])
        for name, value in trainer.model.state_dict().items()
    )


def test_a_weight_named_version_is_not_a_checkpoint_version(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"version": torch.tensor(7.0), "weight": torch.ones(2)}, path)
    assert set(load_checkpoint(path)) == {"version", "weight"}
