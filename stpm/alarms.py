"""The line's alarms, read from the record: no part for a while, anomalous parts in a row, drift.

Drift is a change that touches every part (a lamp, a camera, a new batch of material) rather
than a defect on one: the rolling mean of the last parts' scores leaving the range the model's
defect-free validation images scored in. (The image term alone would tell a global change
from a local one better, but model files keep the validation images' full scores only.)
Each alarm is also a Prometheus gauge (stpm.serve.Metrics).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .record import Record


@dataclass(frozen=True)
class Rules:
    """When each alarm fires. quiet_minutes: no part for this long (once parts have come);
    anomalous_run: this many anomalous parts in a row; drift_window: parts in the rolling mean."""

    quiet_minutes: float = 5.0
    anomalous_run: int = 5
    drift_window: int = 20


def alarms(record: Record, rules: Rules, validation: dict[str, list[float]], now=None) -> dict:
    """{alarm: {"active": bool, "detail": words}} for quiet, run and drift. validation: each
    model's validation scores, by the model's name."""
    now = time.time() if now is None else now
    recent = record.parts(limit=max(rules.anomalous_run, rules.drift_window))
    found = {}
    if recent:
        idle = (now - recent[0]["time"]) / 60
        found["quiet"] = (idle >= rules.quiet_minutes, f"last part {idle:.1f} min ago")
    else:
        found["quiet"] = (False, "no part yet")
    run = 0
    for part in recent:
        if part["verdict"] != "anomalous":
            break
        run += 1
    found["run"] = (run >= rules.anomalous_run, f"{run} anomalous in a row")
    found["drift"] = drift(recent, rules, validation)
    return {name: {"active": active, "detail": detail} for name, (active, detail) in found.items()}


def drift(recent: list[dict], rules: Rules, validation: dict[str, list[float]]):
    """(active, detail): the mean score of the newest drift_window parts of the newest part's
    model against the range of that model's validation scores."""
    if not recent:
        return False, "no part yet"
    model = recent[0]["model_name"]
    window = [
        part["score"]
        for part in recent[: rules.drift_window]
        if part["model_name"] == model and part["score"] is not None
    ]
    scores = validation.get(model) or []
    if len(window) < rules.drift_window or len(scores) < 2:
        return False, f"{len(window)} of {rules.drift_window} parts to judge by"
    mean, low, high = sum(window) / len(window), min(scores), max(scores)
    active = not low <= mean <= high
    return (
        active,
        f"mean score of the last {len(window)} {mean:.4g}; validation {low:.4g}-{high:.4g}",
    )
