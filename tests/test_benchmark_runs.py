"""Several runs of a benchmark suite merge into one result per case (bench/common.py)."""

import json
import sys
from pathlib import Path

import pytest

# bench/ is not a package: its scripts import each other as top-level modules.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import common


def suite_json(path: Path, seconds: list[float], peak_mb: float) -> Path:
    """A pytest-benchmark JSON of one timed case and one measured-value case."""
    info = {"kernel": "dfl", "provider": "stable_dfl", "mode": "forward", "dtype": "fp32"}
    cases = [
        {
            "fullname": "test_dfl[fp32-6400-forward-stable_dfl]",
            "extra_info": {**info, "x": 6400, "device": "cpu", "torch": "t", "commit": "c"},
            "stats": {"data": seconds},
        },
        {
            "fullname": "test_dfl_extra_memory[stable_dfl-peak_extra_mb]",
            "extra_info": {
                **info,
                "x": 537600,
                "metric": "peak_extra_mb",
                "value": peak_mb,
                "device": "cpu",
                "torch": "t",
                "commit": "c",
            },
            "stats": {"data": [0.5]},
        },
    ]
    path.write_text(json.dumps({"benchmarks": cases}))
    return path


def test_each_case_is_over_the_rounds_of_every_run(tmp_path):
    runs = [
        suite_json(tmp_path / "a.json", [0.001, 0.002], 30.0),
        suite_json(tmp_path / "b.json", [0.009, 0.009, 0.009], 40.0),
        suite_json(tmp_path / "c.json", [0.003], 35.0),
    ]
    merged = tmp_path / "merged.json"
    common.merge_benchmark_runs(runs, merged)
    assert common.runs_in_benchmark_json(merged) == 3
    rows = {r["metric"]: r for r in common.rows_from_benchmark_json(merged)}
    # Six rounds: 1, 2, 3, 9, 9, 9 ms, whose median is 6 ms; no run alone gives it.
    assert rows["time_ms"]["y50"] == pytest.approx(6.0)
    assert rows["peak_extra_mb"]["y50"] == 35.0
    assert common.run_header(list(rows.values()), 3).endswith(
        "over the rounds of 3 runs of the suite.\n\n"
    )


def test_a_single_run_reads_as_one(tmp_path):
    single = suite_json(tmp_path / "a.json", [0.001], 30.0)
    assert common.runs_in_benchmark_json(single) == 1
    rows = common.rows_from_benchmark_json(single)
    assert common.run_header(rows).endswith("commit c; medians.\n\n")
