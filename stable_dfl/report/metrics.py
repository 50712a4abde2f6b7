"""Reads the trainer's ``metrics.jsonl`` (one JSON object per line), never the text log.

The records and their fields are those of :mod:`stable_dfl.train.records`: the step
records, and the ``val`` (the untrained model) and ``epoch`` records, which carry the
validation mAP.

Nothing in the file is trusted. Each line is decoded on its own; a line that is not UTF-8,
not JSON, not a JSON object, has no string ``kind``, has a ``run_id`` that is not a plain
id (:data:`RUN_ID_PATTERN`), or is a record of a known kind whose fields are missing or of
the wrong type is *malformed*: it is ignored and listed, with its 1-based number and the
reason, in :attr:`RunMetrics.malformed` (whichever run it belongs to). Records of kinds
this version does not know are otherwise ignored silently. A run that is still being
written may end in a partial line (no newline yet): it is ignored and not counted.

A file may hold several runs, told apart by the ``run_id`` of their records (records
without one, written before run ids, form one run of their own, id ``None``). One run is
read: the one asked for, else the latest (whose first record comes last). A resumed run
keeps its run id and repeats the steps after its last checkpoint; the later record of a
step wins.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..train.records import EVALUATION_KINDS, METRICS_NAME, RESUME_KIND, STEP_KIND

#: How ``--run_id`` and the messages name the run of the records without a ``run_id``.
NO_RUN_ID = "none"
#: Counters beyond this are corrupt, not long runs (and would overflow float64 and numpy).
MAX_COUNT = 2**53
#: A run id is printed and typed back as ``--run_id``: plain characters only.
RUN_ID_PATTERN = re.compile(r"[0-9A-Za-z_.-]{1,64}")


@dataclass(frozen=True)
class MalformedLine:
    line: int
    """1-based."""
    reason: str


@dataclass
class RunMetrics:
    path: Path
    steps: list[dict[str, Any]] = field(default_factory=list)
    """Step records (:class:`~stable_dfl.train.records.StepRecord`) in step order, one per step."""
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    """``val`` and ``epoch`` records (:class:`~stable_dfl.train.records.ValRecord`,
    :class:`~stable_dfl.train.records.EpochRecord`), in step order."""
    malformed: list[MalformedLine] = field(default_factory=list)
    """The file's malformed lines (of any run), in file order."""
    run_id: str | None = None
    """The run read (``None``: records without a ``run_id``)."""
    run_ids: list[str | None] = field(default_factory=list)
    """Every run in the file, in the order of their first records."""

    @property
    def malformed_lines(self) -> list[int]:
        return [item.line for item in self.malformed]

    def series(self, name: str) -> list[float]:
        """One step field as floats (NaN where a record lacks it)."""
        return [_as_float(record.get(name)) for record in self.steps]

    def post_clip_norms(self) -> list[float]:
        """Norm of the gradients the optimizer received: ``grad_norm * clip_coef``."""
        return [
            norm * coef
            for norm, coef in zip(self.series("grad_norm"), self.series("clip_coef"), strict=True)
        ]

    @property
    def clip_norm(self) -> float | None:
        values = [v for v in self.series("clip_norm") if math.isfinite(v)]
        return values[-1] if values else None


class NoSuchRunError(LookupError):
    """The metrics file holds no run of the id asked for."""

    def __init__(self, path: Path, run_id: str, run_ids: list[str | None]) -> None:
        self.path, self.run_id, self.run_ids = path, run_id, run_ids
        runs = f"runs: {format_run_ids(run_ids)}" if run_ids else "it holds no records"
        super().__init__(f"{path} holds no run {run_id}; {runs}")


def format_run_id(run_id: str | None) -> str:
    return NO_RUN_ID if run_id is None else run_id


def format_run_ids(run_ids: list[str | None]) -> str:
    return ", ".join(format_run_id(r) for r in run_ids)


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, int | float) else math.nan


# ------------------------------------------------------------------ field checks
# Each returns the value to keep (an integral float count becomes an int) or raises
# ValueError with what the value should have been.


def _number(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("a number")
    try:
        float(value)  # an int past float64 would overflow every later use
    except OverflowError:
        raise ValueError("a number in float range") from None
    return value  # NaN and Inf are measurements, judged by the checks


def _count(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"an int >= {minimum}")
        if value >= MAX_COUNT:
            raise ValueError(f"an int >= {minimum} and < 2**53")
        return value

    return check


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("a bool")
    return value


def _names(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("a list of strings")
    return value


def _relative_path(value: Any) -> str | None:
    """A file inside the run folder (the report opens it), or null."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ValueError("a relative path or null")
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or "\\" in value or "\x00" in value:
        raise ValueError("a path inside the run folder or null")
    return value


_STEP_REQUIRED: dict[str, Callable[[Any], Any]] = {
    "step": _count(1),
    "epoch": _count(0),
    "grad_norm": _number,
    "clip_coef": _number,
    "total_loss": _number,
    "dfl_loss": _number,
}
_STEP_OPTIONAL: dict[str, Callable[[Any], Any]] = {
    "loss_scale": _number,
    "lr": _number,
    "clip_norm": _number,
    "images_per_s": _number,
    "skipped": _bool,
    "grad_finite": _bool,
    "skipped_total": _count(0),
    "nonfinite_params": _names,
    "forensics": _relative_path,
}
_EVALUATION_REQUIRED: dict[str, Callable[[Any], Any]] = {"step": _count(0)}
_RESUME_REQUIRED: dict[str, Callable[[Any], Any]] = {"step": _count(0), "epoch": _count(0)}


def _is_map_key(key: str) -> bool:
    return key.endswith("/map50") or key.endswith("/map")


def _checked(record: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``record`` with the fields of its kind checked and normalised; raises
    ValueError with the reason when one is missing or of the wrong type."""
    kind = record["kind"]
    optional: dict[str, Callable[[Any], Any]] = {}
    if kind == STEP_KIND:
        required, optional = _STEP_REQUIRED, _STEP_OPTIONAL
        extra = [k for k in record if k.endswith("_loss") and k not in required]
    elif kind in EVALUATION_KINDS:
        required, extra = _EVALUATION_REQUIRED, [k for k in record if _is_map_key(k)]
    elif kind == RESUME_KIND:
        required, extra = _RESUME_REQUIRED, []
    else:
        return record
    checked = dict(record)
    for name in required:
        if name not in record:
            raise ValueError(f"{kind} record without '{name}'")
    for name in [*required, *(k for k in optional if k in record), *extra]:
        check = required.get(name) or optional.get(name) or _number
        try:
            checked[name] = check(record[name])
        except ValueError as error:
            # !a: a key from the file stays one printable line in the warning.
            raise ValueError(f"{kind} record: {name!a} not {error}") from None
    return checked


def _parse(raw: bytes) -> dict[str, Any] | None:
    """A line's record (unknown kinds included); None for a blank line; raises ValueError
    with the reason for a malformed one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)  # accepts the NaN / Infinity that json.dumps writes
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
        raise ValueError("not JSON") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if "kind" not in record:
        raise ValueError("record without 'kind'")
    if not isinstance(record["kind"], str):
        raise ValueError("'kind' not a string")
    if "run_id" in record:
        if not isinstance(record["run_id"], str):
            raise ValueError("'run_id' not a string")
        if not RUN_ID_PATTERN.fullmatch(record["run_id"]):
            raise ValueError("'run_id' not 1-64 of 0-9 A-Z a-z _ . -")
    return _checked(record)


def metrics_path(run: str | Path) -> Path:
    """``run`` may be the run folder or the metrics file itself."""
    path = Path(run)
    return path / METRICS_NAME if path.is_dir() else path


def _select(run_ids: list[str | None], run_id: str | None, path: Path) -> str | None:
    if run_id is None:
        return run_ids[-1] if run_ids else None
    if run_id in run_ids:
        return run_id
    if run_id == NO_RUN_ID and None in run_ids:
        return None
    raise NoSuchRunError(path, run_id, run_ids)


def load_run(run: str | Path, run_id: str | None = None) -> RunMetrics:
    """The records of one run of the metrics file at ``run``: ``run_id``, or the latest run
    when None (``"none"`` asks for the records without a run id).

    Raises ``FileNotFoundError`` when there is no metrics file, another ``OSError`` when it
    cannot be read, :class:`NoSuchRunError` when it holds no run ``run_id``. Its content
    never raises: see the module doc.
    """
    path = metrics_path(run)
    malformed: list[MalformedLine] = []
    records: list[dict[str, Any]] = []
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            if not raw.endswith(b"\n"):
                break  # a record still being written
            try:
                record = _parse(raw)
            except ValueError as error:
                malformed.append(MalformedLine(number, str(error)))
                continue
            if record is not None:
                records.append(record)
    run_ids = list(dict.fromkeys(record.get("run_id") for record in records))
    chosen = _select(run_ids, run_id, path)
    steps: dict[int, dict[str, Any]] = {}
    evaluations: dict[tuple[str, int], dict[str, Any]] = {}
    for record in records:
        if record.get("run_id") != chosen:
            continue
        kind = record["kind"]
        if kind == STEP_KIND:
            steps[record["step"]] = record
        elif kind in EVALUATION_KINDS:
            evaluations[(kind, record["step"])] = record
    return RunMetrics(
        path,
        steps=[steps[k] for k in sorted(steps)],
        evaluations=sorted(evaluations.values(), key=lambda r: r["step"]),
        malformed=malformed,
        run_id=chosen,
        run_ids=run_ids,
    )
