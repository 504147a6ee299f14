"""The resumable cursor of a rank: small, JSON-able, versioned and checksummed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from client.plan import Plan
from tokenfeed import wire
from tokenfeed.v1 import tokenfeed_pb2 as pb

STATE_VERSION = 1
#: a state with a data plan: an older client must refuse it (it would ignore the plan and read
#: the skipped steps), while a state without one stays version 1, readable by every client
PLAN_STATE_VERSION = 2
_POSITION_FIELDS = ("row", "epoch", "shard", "shard_row")
_IDENTITY = ("dataset", "seed", "seq_len", "packing")


@dataclass(frozen=True)
class Identity:
    """Which global sequence a state belongs to."""

    dataset: str
    seed: int
    seq_len: int
    packing: str


@dataclass(frozen=True)
class Position:
    """The job's position: the first row of the next step, and where it lies (see DESIGN.md)."""

    row: int = 0
    epoch: int = 0
    shard: int = 0
    shard_row: int = 0
    fingerprint: str = ""  # dataset content identity; empty until the server has named it
    #: a mixture's components: (dataset, row, epoch, shard, shard_row) each
    components: tuple[tuple[str, int, int, int, int], ...] = ()

    @classmethod
    def from_cursor(cls, c: pb.Cursor) -> Position:
        parts = tuple((p.dataset, p.row, p.epoch, p.shard, p.shard_row) for p in c.components)
        return cls(row=c.row, epoch=c.epoch, shard=c.shard, shard_row=c.shard_row, fingerprint=c.fingerprint,
                   components=parts)

    def to_cursor(self, ident: Identity) -> pb.Cursor | None:
        if not self.fingerprint:
            return None  # nothing consumed yet: start of the sequence
        parts = [pb.ComponentCursor(dataset=d, row=r, epoch=e, shard=s, shard_row=sr)
                 for d, r, e, s, sr in self.components]
        return pb.Cursor(version=wire.CURSOR_VERSION, dataset=ident.dataset, fingerprint=self.fingerprint,
                         seed=ident.seed, seq_len=ident.seq_len, packing=ident.packing,
                         row=self.row, epoch=self.epoch, shard=self.shard, shard_row=self.shard_row,
                         components=parts)


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def make_state(ident: Identity, pos: Position, *, rank: int, world_size: int, batch_size: int,
               steps: int, cycle: int, plan: Plan | None = None) -> dict[str, Any]:
    """The state dict: identity, the job position, this rank's bookkeeping and the data plan."""
    plan = plan or Plan()
    body: dict[str, Any] = {
        "version": PLAN_STATE_VERSION if plan.edits else STATE_VERSION,
        **{k: getattr(ident, k) for k in _IDENTITY},
        "fingerprint": pos.fingerprint,
        "position": {k: getattr(pos, k) for k in _POSITION_FIELDS},
        "components": [list(c) for c in pos.components],
        "rank": rank, "world_size": world_size, "batch_size": batch_size,
        "steps": steps,          # steps this rank consumed since the run began (informational)
        "worker_cycle": cycle,   # batches since the DataLoader's round robin began (for per-worker resume)
    }
    if plan.edits:  # "steps" says which edits the position includes (those before it)
        body["plan"] = plan.to_json()
    return {**body, "checksum": _checksum(body)}


def _component(c: Any) -> tuple[str, int, int, int, int]:
    """A mixture component's position from its state form ``[dataset, row, epoch, shard, shard_row]``."""
    name, numbers = str(c[0]), [int(x) for x in c[1:5]]
    if len(numbers) != 4:
        raise ValueError("a component position needs 5 fields")
    row, epoch, shard, shard_row = numbers
    return name, row, epoch, shard, shard_row


def parse_state(state: Any, ident: Identity) -> tuple[Position, dict[str, Any], Plan]:
    """Validate a state for ``ident``; a mismatch or damage raises ``ValueError`` naming it."""
    check_state(state)
    for field in _IDENTITY:
        want, got = getattr(ident, field), state.get(field)
        if got != want:
            raise ValueError(f"tokenfeed state belongs to {field}={got!r}, but this dataset has {field}={want!r}")
    return _position(state), _meta(state), plan_of(state)


def check_state(state: Any) -> None:
    """Refuse what is not a tokenfeed state of a version this client reads, or a damaged one."""
    if not isinstance(state, dict):
        raise ValueError(f"tokenfeed state must be a dict, got {type(state).__name__}")
    if state.get("version") not in (STATE_VERSION, PLAN_STATE_VERSION):
        raise ValueError(f"tokenfeed state version {state.get('version')!r} is not supported "
                         f"(expected {STATE_VERSION} or {PLAN_STATE_VERSION})")
    body = {k: v for k, v in state.items() if k != "checksum"}
    try:
        ok = state.get("checksum") == _checksum(body)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError("tokenfeed state is damaged: its checksum does not match its content "
                         "(truncated or edited by hand?)")


def _position(state: dict[str, Any]) -> Position:
    try:
        parts = tuple(_component(c) for c in state.get("components", []))
        pos = Position(**{k: int(state["position"][k]) for k in _POSITION_FIELDS},
                       fingerprint=str(state["fingerprint"]), components=parts)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"tokenfeed state is missing or has a bad field: {err}") from None
    if min(pos.row, pos.epoch, pos.shard, pos.shard_row, *(x for c in pos.components for x in c[1:])) < 0:
        raise ValueError("tokenfeed state has a negative position")
    return pos


def _meta(state: dict[str, Any]) -> dict[str, int]:
    try:
        meta = {k: int(state[k]) for k in ("rank", "world_size", "batch_size", "steps", "worker_cycle")}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"tokenfeed state is missing or has a bad field: {err}") from None
    if min(meta.values()) < 0:
        raise ValueError("tokenfeed state has a negative position")
    return meta


def plan_of(state: dict[str, Any]) -> Plan:
    """The data plan a (checked) state carries: none in a version-1 state."""
    if state.get("version") == STATE_VERSION:
        if "plan" in state:
            raise ValueError(f"a version-{STATE_VERSION} tokenfeed state cannot carry a data plan")
        return Plan()
    try:
        return Plan.from_json(state["plan"])
    except KeyError:
        raise ValueError(f"a version-{PLAN_STATE_VERSION} tokenfeed state must carry a data plan") from None


def with_plan(state: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """``state`` with its data plan replaced (re-versioned and re-checksummed): for offline edits."""
    check_state(state)
    body = {k: v for k, v in state.items() if k not in ("checksum", "plan")}
    body["version"] = PLAN_STATE_VERSION if plan.edits else STATE_VERSION
    if plan.edits:
        body["plan"] = plan.to_json()
    return {**body, "checksum": _checksum(body)}
