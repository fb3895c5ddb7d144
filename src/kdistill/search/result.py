"""What a search found: every trial as a plain record, the Pareto fronts, the chosen student and the one-line answer.

A trial record (one per Optuna trial, in ``trials.json`` and ``report.search["trials"]``)::

    {"number", "state": "complete" | "pruned" | "over_budget" | "failed" | "running" | "queued" (a warm-start
     candidate the search stopped before), "family", "label",
     "student" (the builder spec), "temperature", "soft_weight", "lr", "val_accuracy" (best epoch of the short run),
     "epochs_run", "train_seconds", "parameters", "size_bytes", "latency_ms", "over_budget" (the limits broken),
     "worker" (host:pid), "error", "warm_start" (queued first, not drawn), "params" (the trial's own)}

The Pareto front along one cost (parameters, bytes or latency) holds the completed trials that no other completed
trial beats, that is none is at least as accurate at a cost no higher and better in one of the two: walking the
trials from the cheapest, each one more accurate than every cheaper one (a tie in cost goes to the more accurate).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdistill.io import atomic_write_json

__all__ = ["COST_AXES", "SearchResult", "pareto_front", "trial_record"]

COST_AXES = (("parameters", "parameters"), ("size_bytes", "bytes"), ("latency_ms", "latency (ms, batch 1)"))


def _state(trial: Any) -> str:
    name = trial.state.name
    if name == "COMPLETE":
        return "complete" if trial.user_attrs.get("trained") else "over_budget"
    return {"PRUNED": "pruned", "FAIL": "failed", "WAITING": "queued"}.get(name, "running")


def trial_record(trial: Any) -> dict[str, Any]:
    """One Optuna frozen trial as the plain record described in the module docstring."""
    attrs = trial.user_attrs
    params = trial.params or dict(trial.system_attrs.get("fixed_params", {}))  # a queued trial: what it will try
    spec = attrs.get("student") or {}
    return {
        "number": trial.number,
        "state": _state(trial),
        "family": params.get("family", spec.get("kind")),
        "label": attrs.get("label"),
        "student": spec,
        "temperature": params.get("temperature"),
        "soft_weight": params.get("soft_weight"),
        "lr": params.get("lr"),
        "val_accuracy": attrs.get("val_accuracy"),
        "epochs_run": attrs.get("epochs_run", 0),
        "train_seconds": attrs.get("train_seconds"),
        "parameters": attrs.get("parameters"),
        "size_bytes": attrs.get("size_bytes"),
        "latency_ms": attrs.get("latency_ms"),
        "over_budget": attrs.get("over_budget", []),
        "worker": attrs.get("worker"),
        "error": attrs.get("error"),
        "warm_start": bool(attrs.get("warm_start", False)),
        "params": dict(params),
    }


def pareto_front(records: Sequence[dict[str, Any]], cost: str) -> list[int]:
    """Trial numbers on the accuracy-vs-``cost`` front of the completed ``records``, cheapest first."""
    points = [r for r in records if r["state"] == "complete" and r.get(cost) is not None]
    points.sort(key=lambda r: (r[cost], -r["val_accuracy"], r["number"]))
    front, best = [], -1.0
    for record in points:
        if record["val_accuracy"] > best:
            front.append(record["number"])
            best = record["val_accuracy"]
    return front


def _choose(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The most accurate completed trial; ties go to fewer parameters, then fewer bytes, then the earlier trial."""
    done = [r for r in records if r["state"] == "complete"]
    if not done:
        return None
    return min(done, key=lambda r: (-r["val_accuracy"], r["parameters"], r["size_bytes"], r["number"]))


@dataclass
class SearchResult:
    """A finished search: ``trials`` (every record), ``chosen`` (the record picked; None when no candidate
    finished), ``budget`` and ``search`` (the settings, as JSON), ``storage`` (where the study lives),
    ``wall_time_s`` (this process), ``final`` (after the chosen student's full training: its test metrics and the
    baseline's, filled in by :func:`kdistill.search.search_and_distill`)."""

    trials: list[dict[str, Any]]
    chosen: dict[str, Any] | None
    budget: dict[str, Any]
    search: dict[str, Any]
    storage: str
    wall_time_s: float
    final: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_trials(
        cls, trials: Sequence[Any], budget: dict[str, Any], search: dict[str, Any], storage: str, wall_time_s: float
    ) -> SearchResult:
        records = [trial_record(trial) for trial in trials]
        return cls(records, _choose(records), budget, search, storage, wall_time_s)

    def counts(self) -> dict[str, int]:
        """How many trials ended in each state (``complete``, ``pruned``, ``over_budget``, ...)."""
        found: dict[str, int] = {}
        for record in self.trials:
            found[record["state"]] = found.get(record["state"], 0) + 1
        return found

    def epochs_trained(self) -> int:
        """Epochs of KD training the search spent, over every trial (its compute, in the engine's unit)."""
        return sum(int(record["epochs_run"] or 0) for record in self.trials)

    def pareto(self) -> dict[str, list[int]]:
        """The trial numbers on each front: ``{"parameters": [...], "size_bytes": [...], "latency_ms": [...]}``."""
        return {cost: pareto_front(self.trials, cost) for cost, _ in COST_AXES}

    def line(self) -> str:
        """The one-line answer: the chosen student, its size, its accuracy, and the best inside the budget seen."""
        from kdistill.report import _human_bytes

        counts = self.counts()
        seen = (
            f"{counts.get('complete', 0) + counts.get('pruned', 0)} trained ({counts.get('pruned', 0)} pruned), "
            f"{counts.get('over_budget', 0)} over budget, {counts.get('failed', 0)} failed"
        )
        chosen = self.chosen
        if chosen is None:
            return f"no student inside the budget finished its short run ({seen})"
        latency = "" if chosen["latency_ms"] is None else f", {chosen['latency_ms']:.3f} ms at batch 1"
        size = f"{chosen['parameters']:,} params, {_human_bytes(chosen['size_bytes'])}{latency}"
        knobs = f"T={chosen['temperature']:.2g}, soft weight {chosen['soft_weight']:.2f}, lr {chosen['lr']:.2g}"
        final = self.final.get("student_accuracy")
        accuracy = (
            f"{self.final.get('split', 'test')} accuracy {final:.4f} after full training (baseline without teacher "
            f"{self.final['baseline_accuracy']:.4f})"
            if final is not None and self.final.get("baseline_accuracy") is not None
            else f"{self.final.get('split', 'test')} accuracy {final:.4f} after full training"
            if final is not None
            else "not trained fully"
        )
        return (
            f"chosen student: {chosen['label']} ({size}; {knobs}): {accuracy}; best inside the budget the search saw: "
            f"trial {chosen['number']}, val accuracy {chosen['val_accuracy']:.4f} in a {chosen['epochs_run']}-epoch "
            f"run; {len(self.trials)} trials: {seen}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "answer": self.line(),
            "chosen": self.chosen,
            "final": self.final,
            "budget": self.budget,
            "search": self.search,
            "storage": self.storage,
            "wall_time_s": self.wall_time_s,
            "epochs_trained": self.epochs_trained(),
            "counts": self.counts(),
            "pareto": self.pareto(),
            "trials": self.trials,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON, atomically (``trials.json``)."""
        return atomic_write_json(path, self.to_dict())
