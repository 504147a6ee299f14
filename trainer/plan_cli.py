"""``tokenfeed-plan``: show and edit a checkpoint's data plan offline.

``tokenfeed-plan show CKPT`` prints the checkpoint's step, its ranks' data positions and the plan's
edits (in the data cursors, and those added offline). ``tokenfeed-plan skip --at-step S --steps N
CKPT`` adds a skip: training step ``S`` (as ``metrics.jsonl`` numbers them; at least the checkpoint's
step + 1) reads what step ``S + N`` would have read. ``tokenfeed-plan exclude --at-step S (--shard N
[--document D] | --from-provenance DUMP) CKPT`` passes over the rows that hold the shard or documents
from step ``S`` on; ``tokenfeed-plan weights --at-step S web=0.2 books=0.8 CKPT`` changes a mixture's
weights from step ``S`` on. The checkpoint's files stay as they were written
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
from collections.abc import Callable
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
    if steps < 0:
        raise ValueError(f"--steps must be 0 or more training steps, got {steps}")
    (edit,) = add_edits(ckpt, at_step, lambda data_step, accum: [Edit.skip(data_step, steps * accum)])
    return edit


def add_edits(ckpt: Path, at_step: int, make: Callable[[int, int], list[Edit]]) -> list[Edit]:
    """Add the edits ``make(data_step, grad_accum)`` returns for training step ``at_step`` to ``ckpt``."""
    loop = read_loop(ckpt)
    step, accum = int(loop["step"]), _accum(loop)
    if at_step <= step:
        raise ValueError(f"--at-step {at_step} is in the past: checkpoint {ckpt.name} has trained steps 1 to {step}; "
                         f"the earliest step an edit can take effect at is {step + 1}")
    new = make((at_step - 1) * accum, accum)
    data = loop["data"][0]
    components = [c[0] for c in data.get("components", [])]
    plan = state_plan(data)
    for e in offline_edits(ckpt):
        plan = plan.apply(e, 0)
    for edit in new:  # the same checks a running job makes
        if edit.op == "weights" and data.get("fingerprint") and not components:  # it has read: a plain dataset
            raise ValueError(f"weights: dataset {data['dataset']!r} is not a mixture: it has no weights")
        unknown = sorted(set(dict(edit.weights)) - set(components)) if components else []
        if unknown:
            raise ValueError(f"weights for {', '.join(map(repr, unknown))}: not in the mixture {data['dataset']!r} "
                             f"(its components: {', '.join(components)})")
        plan = plan.apply(edit, int(data["steps"]))
    path = ckpt / EDITS_FILE
    edits = [*offline_edits(ckpt), *new]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"edits": [e.to_json() for e in edits]}, indent=1))
    tmp.replace(path)
    return new


def from_provenance(path: Path) -> list[tuple[str, int, int]]:
    """The (dataset, shard, document) of every piece in a provenance dump: ``torch.save`` of
    ``batch["provenance"]`` (an int64 ``[n, 7]`` tensor: source 0 is the job's dataset), of a list of
    them, or of ``{"provenance": ..., "sources": [names]}`` (``describe().sources``, for a mixture)."""
    import torch

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a file that is not a dump: say so, not where torch failed
        raise ValueError(f"--from-provenance {path}: cannot read it as a torch.save file ({err})") from None
    sources = raw.get("sources") if isinstance(raw, dict) else None
    records = raw.get("provenance") if isinstance(raw, dict) else raw
    tensors: list[Any] = list(records) if isinstance(records, (list, tuple)) else [records]
    if not tensors or not all(isinstance(t, torch.Tensor) and t.ndim == 2 and t.shape[1] == 7 for t in tensors):
        raise ValueError(f"--from-provenance {path}: expected batch['provenance'] ([n, 7] int64 tensors), "
                         "a list of them, or {'provenance': ..., 'sources': [...]}")
    found = sorted({tuple(r) for t in tensors for r in t[:, [3, 4, 5]].tolist()})
    out = []
    for source, shard, doc in found:
        if sources is not None and source < len(sources):
            out.append((str(sources[source]), shard, doc))
        elif source == 0 and sources is None:
            out.append(("", shard, doc))
        else:
            raise ValueError(f"--from-provenance {path}: source {source} has no name: save "
                             "{'provenance': ..., 'sources': [s.name for s in ds.describe().sources]}")
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenfeed-plan", description="Show and edit a checkpoint's data plan offline.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("show", help="the checkpoint's step, data position and data plan")
    s.add_argument("checkpoint", type=Path, help="RUN_DIR/checkpoints/step_N")
    k = sub.add_parser("skip", help="pass over the data of --steps training steps from training step --at-step")
    k.add_argument("--at-step", type=int, required=True, help="the first training step that reads later data")
    k.add_argument("--steps", type=int, required=True, help="training steps of data to pass over")
    k.add_argument("checkpoint", type=Path, help="RUN_DIR/checkpoints/step_N")
    x = sub.add_parser("exclude", help="from training step --at-step, pass over the rows that hold a shard or document")
    x.add_argument("--at-step", type=int, required=True, help="the first training step that reads without it")
    what = x.add_mutually_exclusive_group(required=True)
    what.add_argument("--shard", type=int, help="shard id (provenance's shard)")
    what.add_argument("--from-provenance", type=Path, metavar="DUMP",
                      help="every document in a torch.save'd batch['provenance'] (see README)")
    x.add_argument("--document", type=int, help="document id in --shard (provenance's document); default: all of it")
    x.add_argument("--dataset", default="", help="a mixture's component the shard belongs to (default: the job's)")
    x.add_argument("checkpoint", type=Path, help="RUN_DIR/checkpoints/step_N")
    w = sub.add_parser("weights", help="a mixture's weights from training step --at-step on")
    w.add_argument("--at-step", type=int, required=True, help="the first training step with the new weights")
    w.add_argument("weights", nargs="+", metavar="NAME=WEIGHT", help="components not named get weight 0")
    w.add_argument("checkpoint", type=Path, help="RUN_DIR/checkpoints/step_N")
    return p


def _parse_weights(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            eq = ""
        if not eq or not name:
            raise ValueError(f"weights: expected NAME=WEIGHT (e.g. web=0.2), got {item!r}")
    return out


def _edit(args: argparse.Namespace) -> str:
    """Carry out an edit command; what to tell the user."""
    if args.command == "skip":
        add_skip(args.checkpoint, args.at_step, args.steps)
        return f"added: training step {args.at_step} reads what step {args.at_step + args.steps} would have read"
    if args.command == "weights":
        weights = _parse_weights(args.weights)
        add_edits(args.checkpoint, args.at_step, lambda step, _: [Edit.mixture_weights(step, weights)])
        return f"added: weights {weights} from training step {args.at_step}"
    if args.from_provenance is not None:
        if args.document is not None:
            raise ValueError("--document goes with --shard, not --from-provenance")
        docs = from_provenance(args.from_provenance)
    else:
        docs = [(args.dataset, args.shard, -1 if args.document is None else args.document)]
    added = add_edits(args.checkpoint, args.at_step,
                      lambda step, _: [Edit.exclude(step, s, d, dataset=n) for n, s, d in docs])
    return f"added: {len(added)} exclusion(s) from training step {args.at_step}"


def main(argv: list[str] | None = None) -> int:
    """Entry point; 0 on success, 2 on a bad request (the message names it)."""
    args = _parser().parse_args(argv)
    try:
        if args.command != "show":
            print(_edit(args))
        print(show(args.checkpoint))
    except (ValueError, OSError) as err:
        print(f"tokenfeed-plan: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
