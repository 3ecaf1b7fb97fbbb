"""One line per measured result, for the benchmark suite (``python -m bench``).

Every script in bench/ prints its own report; it also calls ``record`` with each headline figure.
When the suite runs a script it names a file in ``RECAP_BENCH_RECORD``, and ``record`` appends the
result there as a JSON line; run by hand, ``record`` does nothing."""
from __future__ import annotations

import json
import os
from typing import Any

ENV = "RECAP_BENCH_RECORD"


def record(metric: str, ratio: float | None, *, goal: str = "", value: float | None = None,
           baseline: float | None = None, unit: str = "", against: str = "", **facts: Any) -> None:
    """``metric``: what was measured; ``ratio``: ours over the baseline measured in the same run
    (or the figure itself when there is no baseline, e.g. a recall); ``goal``: e.g. ">= 1.0";
    ``value``/``baseline`` in ``unit``; ``against``: what the baseline is."""
    path = os.environ.get(ENV)
    if not path:
        return
    row = {"metric": metric, "ratio": None if ratio is None else round(float(ratio), 4), "goal": goal,
           "value": value, "baseline": baseline, "unit": unit, "against": against, **facts}
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def meets(ratio: float | None, goal: str) -> bool | None:
    """Whether ``ratio`` meets a goal written as ">= x" or "<= x" (None when there is none)."""
    if ratio is None or not goal:
        return None
    op, _, x = goal.partition(" ")
    try:
        x = float(x)
    except ValueError:
        return None
    return ratio >= x if op == ">=" else ratio <= x if op == "<=" else None
