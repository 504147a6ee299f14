"""A job's data plan: ordered edits of what the job reads, each effective from a global step.

A global step is one batch per rank (the dataset's ``steps`` count). ``skip`` (N from step S): the
job's step ``t >= S`` reads what step ``t + N`` would have read without it; the N global steps
between are passed over (``N x world_size x batch_size`` rows of the global order, with the world
size of the job that reaches step S). An edit whose step the job has passed is *applied*: the
cursor already lies beyond the rows it passed over, so it stays in the plan as a record only.
Serving stays stateless: a stream that starts before a pending skip carries it as ``skip_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Edit", "Plan", "Segment"]

OPS = ("skip",)


@dataclass(frozen=True)
class Edit:
    """One edit of the plan: ``op`` from global step ``at_step`` (``skip``: ``steps`` steps passed over)."""

    op: str
    at_step: int
    steps: int = 0

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown data plan edit {self.op!r}; known: {', '.join(OPS)}")
        if not isinstance(self.at_step, int) or self.at_step < 0:
            raise ValueError(f"a data plan edit's at_step must be a global step >= 0, got {self.at_step!r}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"skip: steps must be 0 or more global steps, got {self.steps!r}")

    @classmethod
    def skip(cls, at_step: int, steps: int) -> Edit:
        return cls("skip", at_step, steps)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "at_step": self.at_step, "steps": self.steps}

    @classmethod
    def from_json(cls, raw: Any) -> Edit:
        if not isinstance(raw, dict) or set(raw) != {"op", "at_step", "steps"}:
            raise ValueError(f"a data plan edit must be {{op, at_step, steps}}, got {raw!r}")
        return cls(str(raw["op"]), raw["at_step"], raw["steps"])


@dataclass(frozen=True)
class Segment:
    """Global steps ``[start, end)`` (``end`` None: no end) that all read ``offset`` steps ahead."""

    start: int
    end: int | None
    offset: int


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
                out.append(Segment(start, edit.at_step, offset))
                start = edit.at_step
            offset += edit.steps
        out.append(Segment(start, None, offset))
        return out

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
            lines.append(f"skip {e.steps} global steps at step {e.at_step}{state}")
        return lines
