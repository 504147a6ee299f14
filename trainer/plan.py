"""Operator requests on the data: ``--rewind-to STEP`` (resume from an older checkpoint) and
``--skip-data-steps N`` (pass over the data of N steps from the resumed step), recorded in
``RUN_DIR/data_plan.json`` so that launching the same command again (a requeue, a crash) neither
rewinds again nor skips twice.

The skip itself lives in the data cursors' plan (``client.plan``), so every checkpoint saved after it
carries it; the record covers the gap until then: a relaunch that resumes from the very checkpoint
the skip was applied at (which predates it) applies the same edit again, once.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RECORD = "data_plan.json"
REWOUND = "rewound"  # under the checkpoints directory: checkpoints a rewind set aside (never chosen)


@dataclass(frozen=True)
class DataRequest:
    """What the command line asks of the data at this launch."""

    rewind_to: int | None = None  #: resume from this checkpoint step, setting newer ones aside
    skip_steps: int = 0  #: optimizer steps of data passed over from the resumed step

    def __post_init__(self) -> None:
        if self.rewind_to is not None and self.rewind_to < 0:
            raise ValueError(f"--rewind-to must be a checkpoint step >= 0, got {self.rewind_to}")
        if self.skip_steps < 0:
            raise ValueError(f"--skip-data-steps must be 0 or more steps, got {self.skip_steps}")

    @property
    def empty(self) -> bool:
        return self.rewind_to is None and not self.skip_steps


@dataclass(frozen=True)
class Honoured:
    """A request as carried out: at which checkpoint step it resumed and where its skip began."""

    request: DataRequest
    resumed_step: int  #: the checkpoint step the job resumed from
    data_step: int  #: the data's global step the skip takes effect at (``resumed_step x grad_accum``)
    data_steps: int  #: global data steps skipped (``skip_steps x grad_accum``)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self.request), "resumed_step": self.resumed_step, "data_step": self.data_step,
                "data_steps": self.data_steps, "time": time.time()}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Honoured:
        request = DataRequest(rewind_to=raw.get("rewind_to"), skip_steps=int(raw.get("skip_steps", 0)))
        return cls(request, int(raw["resumed_step"]), int(raw["data_step"]), int(raw["data_steps"]))


def last_honoured(run_dir: Path) -> Honoured | None:
    """The last request this run directory carried out, or None."""
    path = run_dir / RECORD
    if not path.exists():
        return None
    try:
        history = json.loads(path.read_text())["honoured"]
        return Honoured.from_json(history[-1]) if history else None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is damaged ({err}); fix or delete it (it records --rewind-to and "
                         "--skip-data-steps already carried out)") from None


def record(run_dir: Path, done: Honoured) -> None:
    """Append ``done`` to the run directory's record (atomically: a rename)."""
    path = run_dir / RECORD
    history = json.loads(path.read_text())["honoured"] if path.exists() else []
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"honoured": [*history, done.to_json()]}, indent=1))
    os.replace(tmp, path)


def is_repeat(request: DataRequest, last: Honoured | None) -> bool:
    """The same command again (a requeue, a relaunch after a crash): its rewind is done already."""
    return last is not None and last.request == request


def rewind(root: Path, step: int) -> list[int]:
    """Set aside every checkpoint newer than ``step`` (moved under ``REWOUND``, so the newest one
    left is ``step``); returns their steps. ``ValueError`` when there is no checkpoint ``step``."""
    from trainer.checkpoint import list_checkpoints, step_dir  # torch: not for --help and config errors

    found = list_checkpoints(root)
    if step not in [s for s, _ in found]:
        have = ", ".join(str(s) for s, _ in found) or "none"
        raise ValueError(f"--rewind-to {step}: there is no checkpoint step {step} in {root} (there are: {have}); "
                         "raise checkpoint.keep to keep older checkpoints")
    aside = root / REWOUND / time.strftime("%Y%m%dT%H%M%S")
    moved = []
    for s, path in found:
        if s > step:
            aside.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(aside / path.name))
            moved.append(s)
    assert step_dir(root, step).exists()
    return sorted(moved)
