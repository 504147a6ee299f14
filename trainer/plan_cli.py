"""``tokenfeed-plan``: show and edit a checkpoint's data plan offline.

``tokenfeed-plan show CKPT`` prints the checkpoint's step, its ranks' data positions and the plan's
edits (in the data cursors, and those added offline). ``tokenfeed-plan skip --at-step S --steps N
CKPT`` adds a skip: training step ``S`` (as ``metrics.jsonl`` numbers them; at least the checkpoint's
step + 1) reads what step ``S + N`` would have read. The checkpoint's files stay as they were written
(their sha256 is in its manifest): offline edits go beside them, in ``data_plan_edits.json``, which the
trainer applies to the data cursors when it resumes from that checkpoint; the checkpoints it saves
after that carry them in the cursors' plan.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from client import Edit, Plan, state_plan

EDITS_FILE = "data_plan_edits.json"


def offline_edits(ckpt: Path) -> list[Edit]:
    """The edits added offline to checkpoint ``ckpt`` (in data steps), in the order they were added."""
    path = ckpt / EDITS_FILE
    if not path.exists():
        return []
    try:
        return [Edit.from_json(e) for e in json.loads(path.read_text())["edits"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is damaged ({err}); fix or delete it") from None


def read_loop(ckpt: Path) -> dict[str, Any]:
    """The loop state inside checkpoint ``ckpt`` (step, config, every rank's data cursor), without a job."""
    import torch.distributed.checkpoint as dcp

    if not (ckpt / "manifest.json").is_file():
        raise ValueError(f"{ckpt} is not a tokenfeed checkpoint (no manifest.json); pass a "
                         "RUN_DIR/checkpoints/step_N directory")
    state: dict[str, Any] = {"loop": ""}
    with warnings.catch_warnings():  # "assuming a single process": that is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=ckpt, no_dist=True)
    return json.loads(state["loop"])


def _accum(loop: dict[str, Any]) -> int:
    return int(loop.get("config", {}).get("grad_accum", 1))


def show(ckpt: Path) -> str:
    loop = read_loop(ckpt)
    step, accum, data = int(loop["step"]), _accum(loop), loop["data"]
    now = int(data[0]["steps"])
    lines = [f"checkpoint {ckpt}: training step {step}, {loop['world_size']} ranks, grad_accum {accum}; the data "
             f"has read {now} global steps (one batch per rank each); next training step {step + 1}"]
    plan = state_plan(data[0])
    lines += [f"  {line}" for line in plan.describe(now)] or ["  data plan: no edits"]
    for edit in offline_edits(ckpt):
        lines.append(f"  {Plan((edit,)).describe()[0]} (added offline: applied when a job resumes here)")
    return "\n".join(lines)


def add_skip(ckpt: Path, at_step: int, steps: int) -> Edit:
    """Add a skip at training step ``at_step`` of ``steps`` training steps to ``ckpt``; returns it in data steps."""
    loop = read_loop(ckpt)
    step, accum = int(loop["step"]), _accum(loop)
    if steps < 0:
        raise ValueError(f"--steps must be 0 or more training steps, got {steps}")
    if at_step <= step:
        raise ValueError(f"--at-step {at_step} is in the past: checkpoint {ckpt.name} has trained steps 1 to {step}; "
                         f"the earliest step a skip can take effect at is {step + 1}")
    edit = Edit.skip((at_step - 1) * accum, steps * accum)
    plan = state_plan(loop["data"][0])
    for e in offline_edits(ckpt):
        plan = plan.apply(e, 0)
    plan.apply(edit, int(loop["data"][0]["steps"]))  # the same checks a running job makes
    path = ckpt / EDITS_FILE
    edits = [*offline_edits(ckpt), edit]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"edits": [e.to_json() for e in edits]}, indent=1))
    tmp.replace(path)
    return edit


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenfeed-plan", description="Show and edit a checkpoint's data plan offline.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("show", help="the checkpoint's step, data position and data plan")
    s.add_argument("checkpoint", type=Path, help="RUN_DIR/checkpoints/step_N")
    k = sub.add_parser("skip", help="pass over the data of --steps training steps from training step --at-step")
    k.add_argument("--at-step", type=int, required=True, help="the first training step that reads later data")
    k.add_argument("--steps", type=int, required=True, help="training steps of data to pass over")
    k.add_argument("checkpoint", type=Path, help="RUN_DIR/checkpoints/step_N")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; 0 on success, 2 on a bad request (the message names it)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "skip":
            add_skip(args.checkpoint, args.at_step, args.steps)
            print(f"added: training step {args.at_step} reads what step {args.at_step + args.steps} would have read")
        print(show(args.checkpoint))
    except (ValueError, OSError) as err:
        print(f"tokenfeed-plan: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
