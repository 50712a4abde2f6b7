"""The explained steps of a run: the ``forensics/step_<k>.json`` files its step records name.

Read as untrusted as ``metrics.jsonl``: a file that is missing, not JSON or of the wrong
shape is listed with the reason, never a traceback. Steps recorded as repeats of an
explained loss-scale calibration name the same file and are listed with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .metrics import RunMetrics

#: Characters of a message, verdict or bisection shown (a hostile file stays readable).
MAX_TEXT = 300


@dataclass
class ExplainedStep:
    path: str
    """Relative to the run folder, as the step records name it."""
    steps: list[int] = field(default_factory=list)
    """The steps whose records name this file (the replayed one first)."""
    stage: str = ""
    verdict: str = ""
    message: str = ""
    bisection: str = ""
    problem: str | None = None
    """Why the file could not be read (None: it was)."""

    def describe(self) -> str:
        steps = f"step {self.steps[0]}"
        if len(self.steps) > 1:
            steps += f" (and {len(self.steps) - 1} more like it, to step {self.steps[-1]})"
        if self.problem:
            return f"{steps}: {self.path}: {self.problem}"
        bisection = f"; {self.bisection}" if self.bisection else ""
        return f"{steps}: {self.message}{bisection}; verdict: {self.verdict}"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "steps": self.steps,
            "stage": self.stage,
            "verdict": self.verdict,
            "message": self.message,
            "bisection": self.bisection,
            "problem": self.problem,
        }


def _text(value: Any) -> str:
    return value[:MAX_TEXT].replace("\n", " ") if isinstance(value, str) else ""


def _read(explained: ExplainedStep, run_dir: Path) -> None:
    try:
        document = json.loads((run_dir / explained.path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        explained.problem = "missing"
        return
    except (OSError, UnicodeDecodeError, ValueError) as error:
        explained.problem = f"unreadable ({type(error).__name__})"
        return
    origin = document.get("origin") if isinstance(document, dict) else None
    if not isinstance(origin, dict):
        explained.problem = "not an explanation (no 'origin' object)"
        return
    explained.stage = _text(origin.get("stage"))
    explained.verdict = _text(origin.get("verdict"))
    explained.message = _text(origin.get("message"))
    explained.bisection = _text(document.get("bisection"))


def explained_steps(run: RunMetrics) -> list[ExplainedStep]:
    """One entry per explanation file the run's step records name, in step order."""
    by_path: dict[str, ExplainedStep] = {}
    for record in run.steps:
        path = record.get("forensics")
        if path is not None:
            by_path.setdefault(path, ExplainedStep(path)).steps.append(int(record["step"]))
    for explained in by_path.values():
        _read(explained, run.path.parent)
    return sorted(by_path.values(), key=lambda e: e.steps[0])
