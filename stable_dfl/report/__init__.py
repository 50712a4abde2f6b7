"""``python -m stable_dfl report``: a run's health, judged from its ``metrics.jsonl``."""

from .metrics import MalformedLine, NoSuchRunError, RunMetrics, load_run
from .verdicts import Check, HealthCriteria, Status, judge_run

__all__ = [
    "Check",
    "HealthCriteria",
    "MalformedLine",
    "NoSuchRunError",
    "RunMetrics",
    "Status",
    "judge_run",
    "load_run",
]
