"""``python -m stable_dfl report`` on files it cannot trust: malformed lines, several runs in
one file, gradient norms that are not finite."""

from __future__ import annotations

import json
import math
import random
import re

import pytest

from stable_dfl.__main__ import main
from stable_dfl.report import MalformedLine, NoSuchRunError, Status, judge_run, load_run
from stable_dfl.train.records import METRICS_NAME, EpochRecord, ValRecord

from .test_report import healthy_records, step_record

RUN_A, RUN_B = "0123456789ab", "ba9876543210"


def encode(record: dict) -> bytes:
    return json.dumps(record).encode()


def run_lines(records: list[dict] | None = None, run_id: str | None = None) -> list[bytes]:
    """A healthy run (or ``records``) as the trainer writes it: untrained model, steps, epoch."""
    records = healthy_records() if records is None else records
    untrained = ValRecord(epoch=0, step=0, results={"standard/map50": 0.0, "standard/map": 0.0})
    trained = EpochRecord(
        epoch=1,
        step=len(records),
        losses={},
        results={"standard/map50": 0.2, "standard/map": 0.1},
        skipped_total=0,
        epoch_seconds=1.0,
    )
    lines = [untrained.to_json(), *records, trained.to_json()]
    if run_id is not None:
        lines = [{"run_id": run_id, **line} for line in lines]
    return [encode(line) for line in lines]


def write_lines(run_dir, lines: list[bytes], tail: bytes = b"") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / METRICS_NAME).write_bytes(b"".join(line + b"\n" for line in lines) + tail)


def step_line(**changes) -> bytes:
    """Step 2 of a healthy run with fields replaced (``None`` writes null) or, given the
    ``MISSING`` value, removed."""
    record = step_record(2)
    for name, value in changes.items():
        if value is MISSING:
            record.pop(name)
        else:
            record[name] = value
    return encode(record)


MISSING = object()
NUMERIC_FIELDS = (
    "grad_norm",
    "clip_coef",
    "total_loss",
    "dfl_loss",
    "cls_loss",
    "iou_loss",
    "loss_scale",
    "lr",
    "clip_norm",
    "images_per_s",
)

MALFORMED: list[tuple[str, bytes, str]] = [
    ("array", b"[1,2,3]", "not a JSON object"),
    ("number", b"42", "not a JSON object"),
    ("null", b"null", "not a JSON object"),
    ("string", b'"x"', "not a JSON object"),
    ("not json", b'{"kind": "step", "step": ', "not JSON"),
    ("not utf8", b'\xff\xfe{"kind": "step"}', "not UTF-8"),
    ("nested 1 MB", b"[" * 2**20, "not JSON"),
    (
        "huge 1 MB",
        b'{"kind": "step", "pad": "' + b"a" * 2**20 + b'"}',
        "step record without 'step'",
    ),
    ("only kind", b'{"kind": "step"}', "step record without 'step'"),
    ("no kind", b'{"step": 1, "grad_norm": 0.1}', "record without 'kind'"),
    ("kind a number", b'{"kind": 1}', "'kind' not a string"),
    ("kind null", b'{"kind": null}', "'kind' not a string"),
    (
        "run_id a number",
        encode({"run_id": 5, "kind": "val", "step": 0}),
        "'run_id' not a string",
    ),
    *[
        (
            f"run_id {v!r}",
            encode({"run_id": v, "kind": "future"}),
            "'run_id' not 1-64 of 0-9 A-Z a-z _ . -",
        )
        for v in ("", "a b", "a\nb", "\ud800", "x" * 65)
    ],
    (
        "odd loss key",
        step_line(**{"x\n\u00e9_loss": "1"}),
        "step record: 'x\\n\\xe9_loss' not a number",
    ),
    ("no grad_norm", step_line(grad_norm=MISSING), "step record without 'grad_norm'"),
    ("no dfl_loss", step_line(dfl_loss=MISSING), "step record without 'dfl_loss'"),
    ("no epoch", step_line(epoch=MISSING), "step record without 'epoch'"),
    *[
        (f"step {value!r}", step_line(step=value), "step record: 'step' not an int >= 1")
        for value in ("abc", math.nan, math.inf, None, -1, 0, 1.5, True, [2])
    ],
    ("step 2**60", step_line(step=2**60), "step record: 'step' not an int >= 1 and < 2**53"),
    *[
        (f"epoch {value!r}", step_line(epoch=value), "step record: 'epoch' not an int >= 0")
        for value in ("1", None, -1, 0.5, False)
    ],
    *[
        (f"{name} {value!r}", step_line(**{name: value}), f"step record: '{name}' not a number")
        for name in (*NUMERIC_FIELDS, "box_loss")
        for value in ("0.5", None, True, [0.5], {"v": 1})
    ],
    (
        "grad_norm past float64",
        step_line().replace(b'"grad_norm": 0.8', b'"grad_norm": 1' + b"0" * 400),
        "step record: 'grad_norm' not a number in float range",
    ),
    *[
        (f"{name} {value!r}", step_line(**{name: value}), f"step record: '{name}' not a bool")
        for name in ("skipped", "grad_finite")
        for value in ("no", 0, None)
    ],
    *[
        (
            f"skipped_total {v!r}",
            step_line(skipped_total=v),
            "step record: 'skipped_total' not an int >= 0",
        )
        for v in ("0", 1.5, -1, None)
    ],
    *[
        (
            f"params {v!r}",
            step_line(nonfinite_params=v),
            "step record: 'nonfinite_params' not a list of strings",
        )
        for v in ("w", [1], None, {"w": 1})
    ],
    ("val step text", encode({"kind": "val", "step": "0"}), "val record: 'step' not an int >= 0"),
    ("val no step", encode({"kind": "val", "standard/map50": 0.1}), "val record without 'step'"),
    (
        "val map text",
        encode({"kind": "val", "step": 0, "standard/map50": "0.1"}),
        "val record: 'standard/map50' not a number",
    ),
    (
        "epoch map null",
        encode({"kind": "epoch", "epoch": 1, "step": 5, "prototype/map": None}),
        "epoch record: 'prototype/map' not a number",
    ),
    (
        "epoch step null",
        encode({"kind": "epoch", "step": None}),
        "epoch record: 'step' not an int >= 0",
    ),
    (
        "resume step text",
        encode({"kind": "resume", "step": "x", "epoch": 1}),
        "resume record: 'step' not an int >= 0",
    ),
    ("resume no epoch", encode({"kind": "resume", "step": 3}), "resume record without 'epoch'"),
]


@pytest.mark.parametrize(
    ("line", "reason"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_a_malformed_line_is_ignored_and_named(tmp_path, capsys, line, reason):
    lines = run_lines()
    write_lines(tmp_path / "run", [*lines[:2], line, *lines[2:]])
    run = load_run(tmp_path / "run")
    assert run.malformed == [MalformedLine(3, reason)]
    assert len(run.steps) == 120 and len(run.evaluations) == 2
    assert main(["report", str(tmp_path / "run"), "--no_plots"]) == 0
    warning = capsys.readouterr().err.strip()
    assert warning == f"warning: {run.path}: 1 malformed line ignored (line 3: {reason})"
    # The line alone: nothing to judge, and still no traceback.
    write_lines(tmp_path / "alone", [line])
    assert main(["report", str(tmp_path / "alone"), "--no_plots"]) == 2


@pytest.mark.parametrize(
    "content",
    [b"", b"  \n\t\n\n\r\n", b"\n" * 3 + b"{", b"\xff\xfe", b'{"kind": "step"}\n'],
    ids=["empty", "whitespace", "only a partial line", "only bad bytes", "only a bad record"],
)
def test_files_without_steps_cannot_be_judged(tmp_path, capsys, content):
    (tmp_path / METRICS_NAME).write_bytes(content)
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no step records yet" in capsys.readouterr().err


def test_folders_without_a_readable_metrics_file_cannot_be_judged(tmp_path, capsys):
    assert main(["report", str(tmp_path / "absent"), "--no_plots"]) == 2
    assert main(["report", str(tmp_path), "--no_plots"]) == 2  # no metrics.jsonl in it
    (tmp_path / "odd" / METRICS_NAME).mkdir(parents=True)
    assert main(["report", str(tmp_path / "odd"), "--no_plots"]) == 2
    assert capsys.readouterr().err.count("error:") == 3


def test_the_warning_names_the_first_lines_and_counts_the_rest(tmp_path, capsys):
    lines = run_lines()
    bad = [b"[1,2,3]", step_line(grad_norm=MISSING), b"\xff", b"42", b"null", b"{", b'"x"']
    write_lines(
        tmp_path, [lines[0], bad[0], *lines[1:3], bad[1], *lines[3:6], bad[2], *bad[3:], *lines[6:]]
    )
    run = load_run(tmp_path)
    assert run.malformed_lines == [2, 5, 9, 10, 11, 12, 13]
    assert main(["report", str(tmp_path), "--no_plots", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err.strip() == (
        f"warning: {run.path}: 7 malformed lines ignored (line 2: not a JSON object; "
        "line 5: step record without 'grad_norm'; line 9: not UTF-8; "
        "line 10: not a JSON object; line 11: not a JSON object; and 2 more)"
    )
    (document,) = json.loads(out)["runs"]
    assert document["malformed_lines"][:3] == [
        {"line": 2, "reason": "not a JSON object"},
        {"line": 5, "reason": "step record without 'grad_norm'"},
        {"line": 9, "reason": "not UTF-8"},
    ]
    assert len(document["malformed_lines"]) == 7


def test_what_is_not_malformed(tmp_path):
    lines = run_lines(healthy_records(5))
    measured = step_line(step=6.0, grad_norm=math.nan, total_loss=-math.inf, lr=math.inf)
    unknown = [
        encode({"kind": "future", "step": "any"}),
        encode({"kind": "resume", "step": 3, "epoch": 1}),
    ]
    write_lines(
        tmp_path, [*lines[:-1], measured, *unknown, b"   ", lines[-1]], tail=b'\xff{"kind": "st'
    )
    run = load_run(tmp_path)
    assert run.malformed == []
    assert [r["step"] for r in run.steps] == [1, 2, 3, 4, 5, 6]
    assert type(run.steps[-1]["step"]) is int and math.isnan(run.steps[-1]["grad_norm"])
    assert run.run_ids == [None] and run.run_id is None


def test_random_mutations_of_a_valid_file_never_raise(tmp_path, capsys):
    rng = random.Random(0)
    valid = run_lines(healthy_records(60))
    values = [
        b"null",
        b'"x"',
        b"NaN",
        b"-Infinity",
        b"true",
        b"[]",
        b"{}",
        b"-1",
        b"1.5",
        b"1" + b"0" * 400,
        b'"\\ud800\\n"',
        b'["\\ud800"]',
    ]
    for index in range(200):
        lines = list(valid)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(lines))
            line = bytearray(lines[at])
            mutation = rng.randrange(5)
            if not line:
                continue
            if mutation == 0:  # flip a byte
                line[rng.randrange(len(line))] ^= 1 << rng.randrange(8)
            elif mutation == 1:  # delete a few characters
                start = rng.randrange(len(line))
                del line[start : start + rng.randint(1, 8)]
            elif mutation == 2:  # swap two lines
                other = rng.randrange(len(lines))
                lines[at], lines[other] = lines[other], lines[at]
                continue
            elif mutation == 3:  # replace a value
                spans = [m.span(1) for m in re.finditer(rb": ([^,}]+)", line)]
                if spans:
                    start, end = rng.choice(spans)
                    line[start:end] = rng.choice(values)
            else:  # split a line
                cut = rng.randrange(len(line))
                lines.insert(at + 1, bytes(line[cut:]))
                del line[cut:]
            lines[at] = bytes(line)
        write_lines(tmp_path, lines, tail=rng.choice([b"", b'{"kind"']))
        run = load_run(tmp_path)
        judge_run(run)
        argv = ["report", str(tmp_path), "--json" if index % 2 else "--settle_steps=5"]
        if index % 50:
            argv.append("--no_plots")
        assert main(argv) in (0, 1, 2), index
        out, err = capsys.readouterr()
        (out + err).encode("utf-8")  # no lone surrogate from the file reaches the console


# ------------------------------------------------------------------ several runs in a file


def test_the_latest_run_is_judged_unless_one_is_chosen(tmp_path, capsys):
    unhealthy = run_lines([step_record(s, dfl=8.5) for s in range(1, 121)], run_id=RUN_A)
    write_lines(tmp_path, [*unhealthy, *run_lines(run_id=RUN_B)])
    run = load_run(tmp_path)
    assert (run.run_id, run.run_ids, len(run.steps)) == (RUN_B, [RUN_A, RUN_B], 120)
    assert all(r["run_id"] == RUN_B for r in [*run.steps, *run.evaluations])
    assert statuses(load_run(tmp_path, RUN_A))["dfl_loss"] is Status.FAIL

    assert main(["report", str(tmp_path), "--no_plots"]) == 0
    out, err = capsys.readouterr()
    assert err.strip() == (
        f"note: {run.path} holds 2 runs ({RUN_A}, {RUN_B}); judging the latest, {RUN_B} "
        "(choose with --run_id)"
    )
    assert f"run {RUN_B}" in out
    assert main(["report", str(tmp_path), "--no_plots", "--run_id", RUN_A, "--json"]) == 1
    out, err = capsys.readouterr()
    (document,) = json.loads(out)["runs"]
    assert (document["run_id"], document["run_ids"], err) == (RUN_A, [RUN_A, RUN_B], "")


def test_an_absent_run_id_cannot_be_judged(tmp_path, capsys):
    write_lines(tmp_path, [*run_lines(run_id=RUN_A), *run_lines(run_id=RUN_B)])
    assert main(["report", str(tmp_path), "--no_plots", "--run_id", "feedfacecafe"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / METRICS_NAME} holds no run feedfacecafe; runs: {RUN_A}, {RUN_B}"
    )
    with pytest.raises(NoSuchRunError):
        load_run(tmp_path, "feedfacecafe")


def test_interleaved_runs_and_records_without_a_run_id(tmp_path, capsys):
    old = run_lines([step_record(s, dfl=8.5) for s in range(1, 121)])  # no run_id: older versions
    new = run_lines(run_id=RUN_A)
    write_lines(tmp_path, [line for pair in zip(old, new, strict=True) for line in pair])
    run = load_run(tmp_path)
    assert (run.run_ids, run.run_id, len(run.steps)) == ([None, RUN_A], RUN_A, 120)
    legacy = load_run(tmp_path, "none")
    assert legacy.run_id is None and all("run_id" not in r for r in legacy.steps)
    assert main(["report", str(tmp_path), "--no_plots"]) == 0
    assert f"holds 2 runs (none, {RUN_A})" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--no_plots", "--run_id", "none"]) == 1


def test_a_new_run_without_steps_yet_cannot_be_judged(tmp_path, capsys):
    write_lines(tmp_path, [*run_lines(run_id=RUN_A), *run_lines([], run_id=RUN_B)[:1]])
    assert main(["report", str(tmp_path), "--no_plots"]) == 2
    assert f"holds no step records of run {RUN_B} yet" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--no_plots", "--run_id", RUN_A]) == 0


def test_compare_judges_the_latest_run_of_each_file(tmp_path, capsys):
    bad = run_lines([step_record(s, dfl=8.5) for s in range(1, 121)], run_id=RUN_B)
    write_lines(tmp_path / "a", [*bad, *run_lines(run_id=RUN_A)])
    write_lines(tmp_path / "b", [*run_lines(run_id=RUN_A), *bad])
    argv = ["report", "--no_plots", "--json", "--compare", str(tmp_path / "a"), str(tmp_path / "b")]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    runs = json.loads(out)["runs"]
    assert [(r["run_id"], r["healthy"]) for r in runs] == [(RUN_A, True), (RUN_B, False)]
    assert err.count("note:") == 2
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--run_id", RUN_A])
    assert exit_info.value.code == 2


# ------------------------------------------------------------------ gradient norms not finite


def statuses(run) -> dict[str, Status]:
    return {check.name: check.status for check in judge_run(run)}


def test_a_run_of_only_nonfinite_grad_norms_is_unhealthy(tmp_path, capsys):
    records = [step_record(s, grad_norm=(math.nan, math.inf)[s % 2]) for s in range(1, 121)]
    assert all(r["grad_finite"] and not r["skipped"] for r in records)
    write_lines(tmp_path, run_lines(records))
    checks = {c.name: c for c in judge_run(load_run(tmp_path))}
    grad_norm = checks["grad_norm"]
    assert grad_norm.status is Status.FAIL
    assert "no finite pre-clip norm after step 50" in grad_norm.detail
    assert "120 taken steps with a NaN/Inf norm before or after clipping, first at step 1" in (
        grad_norm.detail
    )
    assert checks["nan_inf_gradients"].status is Status.FAIL
    assert checks["nan_inf_gradients"].values["count"] == 120
    assert main(["report", str(tmp_path), "--no_plots"]) == 1
    out = capsys.readouterr().out
    assert "no finite pre-clip norm" in out and out.rstrip().endswith("UNHEALTHY")


def test_one_taken_step_with_a_nonfinite_norm_fails(tmp_path):
    records = healthy_records()
    records[79] = step_record(80, clip_coef=math.nan)  # post-clip NaN, pre-clip finite
    records[9] = step_record(10, grad_norm=math.inf)  # before settling: a FAIL, not PENDING
    write_lines(tmp_path, run_lines(records[:30]))
    assert statuses(load_run(tmp_path))["grad_norm"] is Status.FAIL
    write_lines(tmp_path, run_lines(records))
    check = next(c for c in judge_run(load_run(tmp_path)) if c.name == "grad_norm")
    assert check.status is Status.FAIL
    assert check.values["nonfinite_norm_steps"] == 2
    assert check.values["first_nonfinite_norm_step"] == 10


def test_a_skipped_step_with_a_nan_norm_is_judged_as_a_skip(tmp_path):
    records = healthy_records()
    records[69] = step_record(70, grad_norm=math.nan, grad_finite=False, skipped=True)
    write_lines(tmp_path, run_lines(records))
    result = statuses(load_run(tmp_path))
    assert result["grad_norm"] is Status.PASS  # the optimizer never saw it
    assert result["nan_inf_gradients"] is Status.FAIL


def test_names_from_the_file_are_printed_as_one_encodable_line(tmp_path, capsys):
    records = healthy_records()
    records[69] = step_record(
        70, grad_finite=False, skipped=True, nonfinite_params=["head.\ud800\nweight"]
    )
    lines = run_lines(records)
    lines[-1] = lines[-1].replace(b'"standard/map"', b'"\\ud800\\n/map50": 0.2, "standard/map"')
    write_lines(tmp_path, lines)
    assert main(["report", str(tmp_path), "--no_plots"]) == 1
    out = capsys.readouterr().out
    out.encode("utf-8")
    assert "in 'head.\\ud800\\nweight'" in out and "'\\ud800\\n/map50' 0.200" in out
