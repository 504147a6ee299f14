"""A job's data plan: ordered edits of what the job reads, each effective from a global step.

A global step is one batch per rank (the dataset's ``steps`` count). ``skip`` (N from step S): the
job's step ``t >= S`` reads what step ``t + N`` would have read without it; the N global steps
between are passed over (``N x world_size x batch_size`` rows of the global order, with the world
size of the job that reaches step S). An edit whose step the job has passed is *applied*: the
cursor already lies beyond the rows it passed over, so it stays in the plan as a record only.
Serving stays stateless: a stream that starts before a pending skip carries it as ``skip_rows``.

``exclude`` (a shard, or a document of it, by the ids ``batch["provenance"]`` reports, from step S):
from the first row of step S on, the job's sequence leaves out every packed row that holds a token
of the shard or document; nothing is re-packed, so every other row is read as it was packed (the
other documents' pieces that share a row with an excluded one go with it). ``weights`` (a mixture's
weights from step S): from the first row of step S, each component's expected rows grow by its new
weight (the configured schedule before it); the largest-deficit rule keeps every component within
one row of that (so its rows since S within two rows of rows-since-S x its new weight). Both stay
in effect after their step: every stream carries them with the job row they begin at (``row``),
which the job fixes when it first streams past the step (the world size then decides it) and keeps
in the plan, so a resume anywhere reads the same rows.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Edit", "Plan", "Segment"]

OPS = ("skip", "exclude", "weights")


@dataclass(frozen=True)
class Edit:
    """One edit of the plan: ``op`` from global step ``at_step``. ``skip``: ``steps`` steps passed
    over; ``exclude``: shard ``shard`` of ``dataset`` (empty: the job's dataset), or its document
    ``document`` (-1: the whole shard); ``weights``: the mixture's ``weights`` ((component, weight)
    pairs; a component not named gets 0). ``row``: the job row an exclude or weights edit begins
    at, once the job has fixed it."""

    op: str
    at_step: int
    steps: int = 0
    dataset: str = ""
    shard: int = -1
    document: int = -1
    weights: tuple[tuple[str, float], ...] = ()
    row: int | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown data plan edit {self.op!r}; known: {', '.join(OPS)}")
        if not isinstance(self.at_step, int) or self.at_step < 0:
            raise ValueError(f"a data plan edit's at_step must be a global step >= 0, got {self.at_step!r}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"skip: steps must be 0 or more global steps, got {self.steps!r}")
        if self.op == "exclude" and (not isinstance(self.shard, int) or self.shard < 0):
            raise ValueError(f"exclude: shard must be a shard id >= 0 (provenance's shard), got {self.shard!r}")
        if self.op == "exclude" and (not isinstance(self.document, int) or self.document < -1):
            raise ValueError(f"exclude: document must be a document id >= 0 (or -1: the whole shard), "
                             f"got {self.document!r}")
        if self.op == "weights":
            values = [w for _, w in self.weights]
            if not values or any(not math.isfinite(w) or w < 0 for w in values) or sum(values) <= 0:
                raise ValueError(f"weights must be finite, 0 or more and not all 0, got {dict(self.weights)}")

    @classmethod
    def skip(cls, at_step: int, steps: int) -> Edit:
        return cls("skip", at_step, steps)

    @classmethod
    def exclude(cls, at_step: int, shard: int, document: int | None = None, dataset: str = "") -> Edit:
        """Exclude shard ``shard`` of ``dataset`` (default: the job's), or only its document ``document``."""
        return cls("exclude", at_step, dataset=dataset, shard=shard, document=-1 if document is None else document)

    @classmethod
    def mixture_weights(cls, at_step: int, weights: dict[str, float]) -> Edit:
        """A mixture's weights (component -> weight) from ``at_step`` on."""
        return cls("weights", at_step, weights=tuple(sorted((str(k), float(v)) for k, v in weights.items())))

    def same_as(self, other: Edit) -> bool:
        """The same edit, whatever job row either has fixed (an exclusion's empty dataset is the job's)."""
        a, b = dataclasses.replace(self, row=None), dataclasses.replace(other, row=None)
        if not (a.dataset and b.dataset):
            a, b = dataclasses.replace(a, dataset=""), dataclasses.replace(b, dataset="")
        return a == b

    def resolved(self, row: int | None) -> Edit:
        return dataclasses.replace(self, row=row)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op, "at_step": self.at_step}
        if self.op == "skip":
            out["steps"] = self.steps
        elif self.op == "exclude":
            out.update(dataset=self.dataset, shard=self.shard, document=self.document)
        else:
            out["weights"] = dict(self.weights)
        if self.row is not None:
            out["row"] = self.row
        return out

    @classmethod
    def from_json(cls, raw: Any) -> Edit:
        keys = {"skip": {"steps"}, "exclude": {"dataset", "shard", "document"}, "weights": {"weights"}}
        op = raw.get("op") if isinstance(raw, dict) else None
        want = {"op", "at_step", *keys.get(str(op), set())}
        if not isinstance(raw, dict) or not want <= set(raw) <= want | {"row"}:
            raise ValueError(f"a data plan edit must be {{{', '.join(sorted(want))}}}, got {raw!r}")
        if op == "weights":
            if not isinstance(raw["weights"], dict):
                raise ValueError(f"weights must be a {{component: weight}} mapping, got {raw['weights']!r}")
            return cls("weights", raw["at_step"], weights=tuple(sorted(raw["weights"].items())), row=raw.get("row"))
        extra = {k: raw[k] for k in keys.get(str(op), ())}
        return cls(str(op), raw["at_step"], **extra, row=raw.get("row"))

    def describe(self) -> str:
        """For people: what the edit does."""
        if self.op == "skip":
            return f"skip {self.steps} global steps at step {self.at_step}"
        if self.op == "exclude":
            what = "the whole shard" if self.document < 0 else f"document {self.document}"
            where = f" of {self.dataset!r}" if self.dataset else ""
            return f"exclude {what} of shard {self.shard}{where} from step {self.at_step}"
        shares = ", ".join(f"{k}={v:g}" for k, v in self.weights)
        return f"weights {shares} from step {self.at_step}"


@dataclass(frozen=True)
class Segment:
    """Global steps ``[start, end)`` (``end`` None: no end) that all read ``offset`` steps ahead,
    with the exclude and weights ``edits`` in effect (those at ``start`` or before)."""

    start: int
    end: int | None
    offset: int
    edits: tuple[Edit, ...] = ()


@dataclass(frozen=True)
class Plan:
    """The ordered edits (by ``at_step``, then the order they were applied in)."""

    edits: tuple[Edit, ...] = ()

    def apply(self, edit: Edit, now: int) -> Plan:
        """This plan with ``edit`` added; ``now`` is the next global step the job will read, and an
        edit before it is refused (the job has read that step already)."""
        if edit.at_step < now:
            raise ValueError(f"data plan edit at step {edit.at_step} is in the past: the job has read "
                             f"{now} global steps; the earliest step an edit can take effect is {now}")
        later = sorted((*self.edits, edit), key=lambda e: e.at_step)  # stable: same-step edits keep their order
        return Plan(tuple(later))

    def pending(self, now: int) -> tuple[Edit, ...]:
        """Edits the job has not reached: at ``now`` or later (the cursor does not include them yet)."""
        return tuple(e for e in self.edits if e.at_step >= now)

    def segments(self, now: int) -> list[Segment]:
        """From step ``now`` on: runs of steps with the same offset (steps ahead of the cursor's sequence)."""
        out, start, offset = [], now, 0
        for edit in self.pending(now):
            if edit.at_step > start:
                out.append(Segment(start, edit.at_step, offset, self._in_effect(start)))
                start = edit.at_step
            offset += edit.steps
        out.append(Segment(start, None, offset, self._in_effect(start)))
        return out

    def _in_effect(self, step: int) -> tuple[Edit, ...]:
        return tuple(e for e in self.edits if e.op != "skip" and e.at_step <= step)

    def resolve(self, now: int, row: int, rows_per_step: int) -> Plan:
        """This plan with the job row of each pending exclude or weights edit fixed, for a job at
        step ``now`` and row ``row`` (its cursor's) that reads ``rows_per_step`` rows a step (and
        passes over the skips before it). Edits the job has passed keep their rows."""
        out = []
        for e in self.edits:
            if e.at_step >= now and e.op != "skip":  # after every skip up to its step (also at it)
                offset = sum(s.steps for s in self.edits if s.op == "skip" and now <= s.at_step <= e.at_step)
                e = e.resolved(row + (e.at_step - now + offset) * rows_per_step)
            out.append(e)
        return Plan(tuple(out))

    def to_json(self) -> list[dict[str, Any]]:
        return [e.to_json() for e in self.edits]

    @classmethod
    def from_json(cls, raw: Any) -> Plan:
        if not isinstance(raw, list):
            raise ValueError(f"a data plan must be a list of edits, got {type(raw).__name__}")
        edits = tuple(Edit.from_json(e) for e in raw)
        if list(edits) != sorted(edits, key=lambda e: e.at_step):
            raise ValueError("a data plan's edits must be ordered by at_step")
        return cls(edits)

    def describe(self, now: int | None = None) -> list[str]:
        """One line per edit, for people (``tokenfeed-plan show``)."""
        lines = []
        for e in self.edits:
            state = "" if now is None else (" (pending)" if e.at_step >= now else " (applied)")
            lines.append(f"{e.describe()}{state}")
        return lines
