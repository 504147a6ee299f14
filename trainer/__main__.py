"""``tokenfeed-train`` / ``torchrun -m trainer``: parse the config, join the job, train."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from typing import Any

from trainer.config import ConfigError, TrainConfig, build_config, parse_overrides
from trainer.marker import finished
from trainer.plan import DataRequest

log = logging.getLogger("trainer")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenfeed-train", description="FSDP2 training on a tokenfeed stream. Launch one process per "
        "rank with torchrun (`torchrun --nproc-per-node N -m trainer ...`), or run it plainly for one rank.",
        epilog="Overrides: section.field=value (YAML values), e.g. model.width=256 eval.every=0 "
               "'data.address=[h1:50051, h2:50051]'. Flags win over overrides, overrides over the file.")
    p.add_argument("--config", help="YAML config (default: built-in defaults, a tiny CPU-sized model)")
    p.add_argument("--address", action="append", help="server host:port (repeat, or comma-separate, for replicas)")
    p.add_argument("--dataset", help="dataset name on the server")
    p.add_argument("--run-dir", help="directory for checkpoints, metrics.jsonl and the final model")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, help="seed of the model init and the data order")
    p.add_argument("--resume", action="store_true", help="require a checkpoint to resume from (without it a "
                   "run resumes from its run directory when one is there, else starts fresh)")
    p.add_argument("--force-continue", action="store_true", help="train an early-stopped run further (up to "
                   "--max-steps); a run that ended at max_steps goes on by itself when launched with a larger one")
    p.add_argument("--rewind-to", type=int, metavar="STEP", help="resume from checkpoint STEP instead of the newest "
                   "(newer ones are set aside under checkpoints/rewound/); done once: the same command again "
                   "continues from the newest checkpoint")
    p.add_argument("--skip-data-steps", type=int, metavar="N", default=0, help="pass over the data of N steps "
                   "from the resumed step (recorded in the data cursors' plan and RUN_DIR/data_plan.json, so a "
                   "later launch never skips twice)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    return p


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    if args.address:
        addresses = [a.strip() for item in args.address for a in item.split(",") if a.strip()]
        tree.setdefault("data", {})["address"] = addresses[0] if len(addresses) == 1 else addresses
    if args.dataset is not None:
        tree.setdefault("data", {})["dataset"] = args.dataset
    if args.checkpoint_every is not None:
        tree.setdefault("checkpoint", {})["every"] = args.checkpoint_every
    for key in ("run_dir", "max_steps", "seed"):
        if getattr(args, key) is not None:
            tree[key] = getattr(args, key)
    return tree


def load(argv: list[str]) -> tuple[TrainConfig, bool]:
    """The validated config and the ``--resume`` flag from a command line."""
    cfg, resume, _ = load_launch(argv)
    return cfg, resume


def load_launch(argv: list[str]) -> tuple[TrainConfig, bool, bool]:
    """The validated config and the ``--resume`` and ``--force-continue`` flags from a command line."""
    return _build(_parser().parse_intermixed_args(argv))


def _data_request(args: argparse.Namespace) -> DataRequest:
    try:
        return DataRequest(rewind_to=args.rewind_to, skip_steps=args.skip_data_steps)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _build(args: argparse.Namespace) -> tuple[TrainConfig, bool, bool]:
    overrides = parse_overrides(args.overrides)
    for section, value in _flag_overrides(args).items():
        if isinstance(value, dict):
            overrides[section] = {**overrides.get(section, {}), **value}
        else:
            overrides[section] = value
    return build_config(args.config, overrides), args.resume, args.force_continue


def extends(done: dict[str, Any], cfg: TrainConfig, force_continue: bool) -> bool:
    """Whether a launch trains the finished run ``done`` (its ``COMPLETE`` marker) further: it asks for more
    steps than the run made, and the run ended at max_steps, or stopped early and ``--force-continue`` is given."""
    step = done.get("step")
    if not isinstance(step, int) or cfg.max_steps <= step:
        return False
    return done.get("reason") == "max_steps" or (done.get("reason") == "early_stop" and force_continue)


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2: bad config, 1: failure, 0: done).

    What is alive when it returns (torch's modules, the model, the optimizer; every file and
    tracker is closed by then) is frozen out of the garbage collector: the interpreter's last
    collection at exit walked it all, about 1 s of every rank's exit on 2 busy cores (0.4 s left)."""
    code = _main(argv)
    gc.freeze()
    return code


def _main(argv: list[str] | None) -> int:
    _setup_logging()
    try:
        args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
        cfg, require_resume, force_continue = _build(args)
        request = _data_request(args)
    except ConfigError as err:
        print(f"tokenfeed-train: {err}", file=sys.stderr)
        return 2
    done = finished(cfg.run_dir)
    extend = done is not None and extends(done, cfg, force_continue)
    if done is not None and not extend:
        tracked = done.get("tracking") or {}
        uploaded = f", uploaded as {tracked.get('artifact')}" if tracked.get("uploaded") else ""
        further = ("--force-continue and a --max-steps above its step" if done.get("reason") == "early_stop"
                   else "a --max-steps above its step")
        log.info("run %s already finished (%s at step %s; final model %s%s): nothing to do. Launch it with %s "
                 "to train it further.", cfg.run_dir, done.get("reason"), done.get("step"), done.get("final_model"),
                 uploaded, further)
        return 0
    if done is not None:
        log.info("extending run %s (%s at step %s) to step %d: it continues from its last checkpoint", cfg.run_dir,
                 done.get("reason"), done.get("step"), cfg.max_steps)
    # torch is imported only now: --help, config errors and finished runs answer at once
    from trainer.checkpoint import CheckpointError, CheckpointMismatch
    from trainer.data import DataUnavailable, describe
    from trainer.loop import Trainer
    from trainer.parallelize import init_distributed, shutdown_distributed
    from trainer.tracking import TrackingError

    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        served = describe(cfg, rank, world)  # before joining the job: an unreachable server fails fast
        code = Trainer(cfg, init_distributed(), served).run(require_resume or extend, force_continue, request)
        # Only after a clean run: a rank that failed must not wait in a teardown collective for the
        # others (torchrun stops them). The Trainer is gone by now, so the process group's
        # resources are released while the interpreter is fully alive.
        shutdown_distributed()
        return code
    except (ConfigError, CheckpointMismatch) as err:
        log.error("%s", err)
        return 2
    except (DataUnavailable, CheckpointError, TrackingError, ValueError) as err:
        log.error("%s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
