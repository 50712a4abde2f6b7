"""Every option is checked at parse time against its range: a value out of it is one
``error:`` line naming the option and exit code 2, before anything is built or written."""

from __future__ import annotations

import pytest

from stable_dfl.train import TrainConfig
from stable_dfl.train.cli import main as train_main
from stable_dfl.train.config import ConfigError, parse_config

BAD_OPTIONS = [
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (["--batch_size", "-1"], "--batch_size must be >= 1, got -1"),
    (["--workers", "-1"], "--workers must be >= 0, got -1"),
    (["--width", "0"], "--width must be >= 1, got 0"),
    (["--fpn_channels", "0"], "--fpn_channels must be >= 1"),
    (["--embed_dim", "-4"], "--embed_dim must be >= 1"),
    (["--n_bins", "1"], "--n_bins must be >= 2 and <= 128, got 1"),
    (["--n_bins", "129"], "--n_bins must be >= 2 and <= 128, got 129"),
    (["--gradient_clip_norm", "0"], "--gradient_clip_norm must be > 0"),
    (["--gradient_clip_norm", "nan"], "--gradient_clip_norm must be > 0"),
    (["--gradient_clip_norm", "inf"], "--gradient_clip_norm must be > 0"),
    (["--train_images", "0"], "--train_images must be >= 1, got 0"),
    (["--val_images", "0"], "--val_images must be >= 1, got 0"),
    (["--image_size", "0"], "--image_size must be >= 32, got 0"),
    (["--image_size", "-32"], "--image_size must be >= 32, got -32"),
    (["--image_size", "48"], "--image_size must be a multiple of 32, got 48"),
    (["--log_interval", "0"], "--log_interval must be >= 1, got 0"),
    (["--debug_interval", "0"], "--debug_interval must be >= 1, got 0"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--epochs", "-3"], "--epochs must be >= 1, got -3"),
    (["--ema_decay", "2"], "--ema_decay must be >= 0 and < 1, got 2.0"),
    (["--ema_decay", "1"], "--ema_decay must be >= 0 and < 1, got 1.0"),
    (["--warmup_steps", "-5"], "--warmup_steps must be >= 0, got -5"),
    (["--min_lr_ratio", "1.5"], "--min_lr_ratio must be >= 0 and <= 1"),
    (["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
    (["--dfl_weight", "nan"], "--dfl_weight must be >= 0"),
    (["--iou_weight", "inf"], "--iou_weight must be >= 0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--save_period", "-1"], "--save_period must be >= 0"),
    (["--max_consecutive_skips", "-1"], "--max_consecutive_skips must be >= 0"),
    (["--lr", "nan"], "--lr must be > 0 and <= 3.40282e+38, got nan"),
    (["--lr", "1e39"], "--lr must be > 0 and <= 3.40282e+38"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--resume", "--init_from", "w.pt"], "--resume continues a run"),
    (["--names", "a,b"], "--names applies to --data only"),
    (["--skip_bad_files"], "--skip_bad_files applies to --data only"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_OPTIONS, ids=lambda v: " ".join(v) or None)
def test_an_option_out_of_range_is_one_error_line_and_exit_2(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        train_main([*argv, "--save_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert f"error: {message}" in err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists(), "nothing is written for a refused command line"


def test_a_config_built_in_code_is_checked_as_the_command_line_is():
    with pytest.raises(ConfigError, match="--batch_size must be >= 1, got 0"):
        TrainConfig(batch_size=0)


def test_the_defaults_and_the_edges_of_each_range_are_accepted():
    TrainConfig()
    parse_config(
        ["--ema_decay", "0", "--min_lr_ratio", "1", "--n_bins", "128", "--warmup_steps", "0"]
    )
    parse_config(["--n_bins", "2", "--image_size", "32", "--workers", "0", "--batch_size", "1"])


def test_the_help_shows_each_range(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "DFL bins per box side (>= 2 and <= 128)" in help_text
    assert "EMA decay of the validation weights (>= 0 and < 1)" in help_text
