"""The report's list of explained steps, from files it does not trust: missing, not JSON, of
the wrong shape, or named by a record with a path that leaves the run folder."""

from __future__ import annotations

import json

import pytest

from stable_dfl.__main__ import main
from stable_dfl.report import load_run
from stable_dfl.report.forensics import MAX_TEXT, explained_steps

from .test_report import healthy_records
from .test_report_malformed import encode, run_lines, write_lines

EXPLANATION = {
    "step": 5,
    "origin": {
        "stage": "loss",
        "verdict": "data",
        "message": "loss component iou_loss_standard = nan (the model's outputs are finite)",
    },
    "bisection": "image 3 of the batch alone reproduces it (images/3.jpg: 1 out of range boxes)",
}


def _run_with(tmp_path, pointers: dict[int, str | None]) -> None:
    records = healthy_records()
    for step, path in pointers.items():
        records[step - 1] = {**records[step - 1], "skipped": True, "forensics": path}
    write_lines(tmp_path, run_lines(records))


def _write(tmp_path, name: str, content) -> None:
    path = tmp_path / "forensics" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())


def test_explained_steps_are_listed_and_plotted(tmp_path, capsys):
    _write(tmp_path, "step_5.json", EXPLANATION)
    _run_with(tmp_path, {5: "forensics/step_5.json", 6: "forensics/step_5.json", 7: None})
    (explained,) = explained_steps(load_run(tmp_path))
    assert explained.steps == [5, 6] and explained.problem is None
    assert main(["report", str(tmp_path), "--settle_steps", "200"]) in (0, 1)
    out = capsys.readouterr().out
    assert (
        "  step 5 (and 1 more like it, to step 6): loss component iou_loss_standard = nan "
        "(the model's outputs are finite); image 3 of the batch alone reproduces it" in out
    )
    assert "verdict: data" in out
    assert (tmp_path / "report" / "training_health.png").stat().st_size > 0


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "missing"),
        (b"{not json", "unreadable (JSONDecodeError)"),
        (b"\xff\xfe", "unreadable (UnicodeDecodeError)"),
        ([1, 2, 3], "not an explanation (no 'origin' object)"),
        ({"origin": "loss"}, "not an explanation (no 'origin' object)"),
    ],
)
def test_a_broken_explanation_file_is_named_not_raised(tmp_path, capsys, content, problem):
    if content is not None:
        _write(tmp_path, "step_5.json", content)
    _run_with(tmp_path, {5: "forensics/step_5.json"})
    (explained,) = explained_steps(load_run(tmp_path))
    assert explained.problem == problem
    main(["report", str(tmp_path), "--no_plots", "--settle_steps", "200"])
    assert f"step 5: forensics/step_5.json: {problem}" in capsys.readouterr().out


def test_hostile_text_is_cut_to_one_short_line(tmp_path):
    _write(
        tmp_path,
        "step_5.json",
        {"origin": {"stage": 3, "verdict": None, "message": "x\n" * 10_000}, "bisection": 7},
    )
    _run_with(tmp_path, {5: "forensics/step_5.json"})
    (explained,) = explained_steps(load_run(tmp_path))
    assert len(explained.message) == MAX_TEXT and "\n" not in explained.message
    assert (explained.stage, explained.verdict, explained.bisection) == ("", "", "")


@pytest.mark.parametrize(
    "pointer", ["/etc/passwd", "../outside.json", "forensics/../../x", 5, "", "a\\b", "x" * 300]
)
def test_a_pointer_outside_the_run_folder_makes_the_line_malformed(tmp_path, pointer):
    records = healthy_records()
    records[4] = {**records[4], "forensics": pointer}
    write_lines(tmp_path, [encode(r) for r in records])
    run = load_run(tmp_path)
    assert [m.line for m in run.malformed] == [5]
    assert "'forensics' not a" in run.malformed[0].reason
    assert explained_steps(run) == []
