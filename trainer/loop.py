"""The training loop: steps, evaluation, checkpoints, early stopping, resume and the finish."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from client import Edit, Plan
from trainer import checkpoint, plan
from trainer.config import TrainConfig, to_yaml
from trainer.data import Described, batch_hash, eval_batches, tokenizer_files, train_loader
from trainer.export import CONFIG_FILE, MODEL_FILE, export
from trainer.marker import MARKER
from trainer.metrics import MetricsLog, TrainerMetrics, rewind
from trainer.model import GPT, build_model, shape_of
from trainer.parallelize import Runtime, autocast, shard_model
from trainer.plan_cli import offline_edits
from trainer.plan import DataRequest, Honoured, is_repeat, last_honoured, record
from trainer.provenance import run_metadata
from trainer.tokenizer import save_run_tokenizer
from trainer.tracking import TrackedRun, TrackingError

log = logging.getLogger(__name__)

_STAT = 3  # per-rank stats before the micro-batch hashes: loss sum, target tokens, data wait


@dataclass
class LoopState:
    """What the loop carries from step to step (saved in every checkpoint)."""

    step: int = 0
    tokens: int = 0
    best_eval: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stop_reason: str | None = None  # "early_stop" once patience ran out


def lr_factor(epoch: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``epoch + 1``: linear warmup, then cosine."""
    if epoch < warmup:
        return (epoch + 1) / warmup
    progress = min(1.0, (epoch - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings, not norms/biases
    rest = [p for p in model.parameters() if p.dim() < 2]
    o = cfg.optim
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=o.lr, betas=o.betas, eps=o.eps)


def _loss_sum(model: GPT, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the batch's targets, and how many targets there were."""
    ids, labels, pos = (batch[k].to(device, non_blocking=True) for k in ("input_ids", "labels", "position_ids"))
    with autocast(device):
        logits = model(ids, pos)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, (labels != -100).sum()


class Trainer:
    """One rank's share of a run. Build it after ``init_distributed``; ``run()`` returns the exit code."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, served: Described) -> None:
        self.cfg, self.rt = cfg, rt
        info = served.info
        #: what made this run's checkpoints (saved in each manifest, the export and the tracker)
        self.provenance = run_metadata(rt.world_size, info, served.server_version)
        self.meta = {"vocab_size": info.vocab_size, "eos_id": info.eos_id, "pad_id": info.pad_id,
                     "bos_id": info.bos_id, "tokenizer": info.tokenizer, "dataset": cfg.data.dataset,
                     "metadata": self.provenance}
        self.tokenizer_file: Path | None = None  # the data's tokenizer, kept with the export (rank 0)
        self.shape = shape_of(cfg.model, info.vocab_size)
        self.model = shard_model(build_model(cfg.model, info.vocab_size, cfg.seed, rt.device), rt.mesh)
        self.optimizer = _optimizer(self.model, cfg)
        self.scheduler = LambdaLR(self.optimizer, partial(
            lr_factor, warmup=cfg.optim.warmup_steps, max_steps=cfg.max_steps, min_ratio=cfg.optim.min_lr_ratio))
        self.loader = train_loader(cfg, rt.rank, rt.world_size)
        self.state = LoopState()
        self.ckpt_root = cfg.run_dir / "checkpoints"
        self.resumed_from: int | None = None
        self.metrics = TrainerMetrics(rt.rank, cfg.metrics_port)
        self.jsonl: MetricsLog | None = None
        self.tracking: TrackedRun | None = None

    # ---- the run -------------------------------------------------------------------------
    def run(self, require_resume: bool = False, force_continue: bool = False,
            request: DataRequest | None = None) -> int:
        """Resume if the run directory has a checkpoint (``request``: rewind to an older one, skip
        data), train to the end, export; 0 on success.

        ``force_continue``: a run that stopped early trains on (its patience counted afresh)."""
        code = 1
        try:
            if self.rt.is_main:
                self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
                (self.cfg.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
                self.tokenizer_file = save_run_tokenizer(self.cfg.run_dir, str(self.meta["tokenizer"]),
                                                         partial(tokenizer_files, self.cfg))
            self._resume(require_resume, request or DataRequest())
            self._reopen(force_continue)
            self._open_tracking()
            if self.rt.is_main:
                self.jsonl = MetricsLog(self.cfg.run_dir / "metrics.jsonl")
            if self.state.stop_reason is None and self.state.step < self.cfg.max_steps:
                self._train()
            code = self._finish()
            return code
        finally:
            self.metrics.close()
            if self.jsonl is not None:
                self.jsonl.close()
            if self.tracking is not None:
                self.tracking.close(ok=code == 0)

    def _open_tracking(self) -> None:
        """Rank 0 starts or continues the tracker run; a failure there fails every rank (none waits)."""
        if self.cfg.tracking.backend == "none":
            return
        error: list[Any] = [None]
        if self.rt.is_main:
            try:
                self.tracking = TrackedRun.open(self.cfg, self.provenance, self.cfg.run_dir / "metrics.jsonl")
            except TrackingError as err:
                error[0] = str(err)
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise TrackingError(f"{error[0]}; check tracking.uri and that the tracker is up, then relaunch")

    def _train(self) -> None:
        cfg, s = self.cfg, self.state
        it = iter(self.loader)
        try:
            for step in range(s.step + 1, cfg.max_steps + 1):
                record = self._step(step, it)
                s.step = step
                improved = False
                if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.max_steps):
                    record["eval_loss"] = self._evaluate()
                    improved = self._judge(step, record["eval_loss"])
                last = step == cfg.max_steps or s.stop_reason is not None
                if improved or last or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                    self._save(step)
                self._report(record)
                if s.stop_reason is not None:
                    log.info("early stop at step %d: no eval improvement in %d evaluations (best %.4f at step %s)",
                             step, s.bad_evals, s.best_eval, s.best_step)
                    break
        finally:
            del it  # stops DataLoader workers and cancels the streams

    def _step(self, step: int, it: Iterator[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics record."""
        cfg, rt = self.cfg, self.rt
        accum = cfg.grad_accum
        start, wait, batches = time.perf_counter(), 0.0, []
        for _ in range(accum):
            t = time.perf_counter()
            batches.append(next(it))  # the data wait: time blocked on the loader
            dt = time.perf_counter() - t
            wait += dt
            self.metrics.data_wait.observe(dt)
        lr = float(self.scheduler.get_last_lr()[0])
        try:
            loss_sum, targets, grad_norm = self._forward_backward(batches)
            self.optimizer.step()  # the first one allocates AdamW's state: it can run out too
        except torch.OutOfMemoryError as err:
            raise RuntimeError(
                f"out of memory on {rt.device} at step {step}: micro-batch input_ids "
                f"[{cfg.data.batch_size}, {cfg.data.seq_len}] (data.batch_size x data.seq_len), grad_accum={accum}, "
                f"model layers={cfg.model.layers} width={cfg.model.width}; lower data.batch_size (raise grad_accum "
                "to keep the global batch) or data.seq_len") from err
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        local = torch.cat([loss_sum.view(1), targets.double().view(1), torch.tensor(
            [wait, *(batch_hash(b["input_ids"]) for b in batches)], dtype=torch.float64, device=rt.device)])
        rows = [torch.empty_like(local) for _ in range(rt.world_size)]
        dist.all_gather(rows, local)
        table = torch.stack(rows).cpu().tolist()  # [rank][stat]; syncs the device, so timing is honest
        return self._record(step, lr, grad_norm, table, time.perf_counter() - start)

    def _record(self, step: int, lr: float, grad_norm: float, table: list[list[float]],
                step_s: float) -> dict[str, Any]:
        """Update the Prometheus metrics and the loop state; the step's metrics.jsonl record."""
        cfg, world = self.cfg, self.rt.world_size
        tokens = cfg.data.batch_size * cfg.data.seq_len * cfg.grad_accum  # per rank
        mine = table[self.rt.rank]
        self.metrics.step(step_s, mine[2], tokens, mine[0] / max(mine[1], 1.0))
        self.state.tokens += tokens * world
        wait = max(r[2] for r in table)  # the slowest rank stalls them all
        return {
            "step": step, "loss": sum(r[0] for r in table) / max(sum(r[1] for r in table), 1.0), "lr": lr,
            "grad_norm": grad_norm, "tokens_per_s": tokens * world / step_s, "data_wait_fraction": wait / step_s,
            "data_wait_s": wait, "step_s": step_s, "tokens": self.state.tokens, "world_size": world,
            "resumed_from": self.resumed_from, "time": time.time(),
            # in global order: micro-batch a of rank r is global batch ((step - 1) * grad_accum + a) * W + r
            "batch_hashes": [f"{int(table[r][_STAT + a]):012x}" for a in range(cfg.grad_accum) for r in range(world)],
        }

    def _forward_backward(self, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, float]:
        assert isinstance(self.model, FSDPModule)  # shard_model made it one
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.rt.device)
        targets = torch.zeros((), dtype=torch.int64, device=self.rt.device)
        for a, batch in enumerate(batches):
            self.model.set_requires_gradient_sync(a == len(batches) - 1)  # reduce-scatter once per step
            loss, n = _loss_sum(self.model, batch, self.rt.device)
            (loss / n.clamp(min=1) / len(batches)).backward()
            loss_sum += loss.detach().double()
            targets += n
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip or math.inf)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return loss_sum, targets, float(norm)

    # ---- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def _evaluate(self) -> float:
        """Token-mean loss over the eval set (same set for any world size)."""
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.rt.device)
        for batch in eval_batches(self.cfg, self.rt.rank, self.rt.world_size):
            loss, n = _loss_sum(self.model, batch, self.rt.device)
            total += torch.stack([loss.double(), n.double()])
        dist.all_reduce(total)
        self.model.train()
        return (total[0] / total[1].clamp(min=1)).item()

    def _judge(self, step: int, eval_loss: float) -> bool:
        """Track the best eval loss; returns whether this one is a new best. Sets early stop."""
        s, e = self.state, self.cfg.eval
        log.info("eval at step %d: loss %.4f (best %s)", step, eval_loss,
                 "none yet" if s.best_eval is None else f"{s.best_eval:.4f} at step {s.best_step}")
        if s.best_eval is None or eval_loss < s.best_eval - e.min_delta:
            s.best_eval, s.best_step, s.bad_evals = eval_loss, step, 0
            return True
        s.bad_evals += 1
        if e.patience and s.bad_evals >= e.patience:
            s.stop_reason = "early_stop"
        return False

    # ---- checkpoints ---------------------------------------------------------------------
    def _save(self, step: int) -> None:
        parts: list[Any] = [None] * self.rt.world_size
        dist.all_gather_object(parts, {"data": self.loader.state_dict(), "rng": checkpoint.capture_rng()})
        loop = {**asdict(self.state), "world_size": self.rt.world_size, "scheduler": self.scheduler.state_dict(),
                "data": [p["data"] for p in parts], "rng": [p["rng"] for p in parts],
                "config": self.cfg.model_dump(mode="json")}
        best = {self.state.best_step} if self.state.best_step is not None else set()
        # save prunes too: only once the new checkpoint is durable, and never the new one itself
        checkpoint.save(self.ckpt_root, step, self.model, self.optimizer, loop, self.shape, self.rt,
                        keep=self.cfg.checkpoint.keep, protect=best, metadata=self.provenance)

    def _resume(self, require: bool, request: DataRequest) -> None:
        last = last_honoured(self.cfg.run_dir)  # every rank reads it before rank 0 may write it
        error: list[Any] = [None]
        if self.rt.is_main:
            checkpoint.remove_partial(self.ckpt_root)
            if request.rewind_to is not None and not is_repeat(request, last):
                try:
                    moved = plan.rewind(self.ckpt_root, request.rewind_to)
                    log.info("--rewind-to %d: set aside the newer checkpoints %s under %s", request.rewind_to,
                             moved or "(none)", self.ckpt_root / plan.REWOUND)
                except ValueError as err:
                    error[0] = str(err)
        dist.broadcast_object_list(error, src=0)  # also the barrier before anyone lists checkpoints
        if error[0] is not None:
            raise ValueError(error[0])
        found = checkpoint.load_latest(self.ckpt_root, self.model, self.optimizer, self.shape, self.rt)
        if found is not None:
            self._load(*found)
            self._apply_offline(found[0])
        elif require:
            raise ValueError(f"--resume: no valid checkpoint in {self.ckpt_root}")
        elif self.rt.is_main:
            rewind(self.cfg.run_dir / "metrics.jsonl", 0)  # a fresh start: steps of a run killed early
        self._skip_data(request, last, found[0] if found is not None else 0)

    def _apply_offline(self, step: int) -> None:
        """The edits ``tokenfeed-plan`` added beside checkpoint ``step`` (the checkpoints saved after
        this resume carry them in the data cursors' plan)."""
        for edit in offline_edits(checkpoint.step_dir(self.ckpt_root, step)):
            if not any(edit.same_as(e) for e in self.loader.plan.edits):
                self.loader.apply(edit)
                if self.rt.is_main:
                    log.info("data plan: %s (added offline with tokenfeed-plan)", Plan((edit,)).describe()[0])

    def _skip_data(self, request: DataRequest, last: Honoured | None, step: int) -> None:
        """Apply ``--skip-data-steps`` at the resumed ``step``: a new request, or the recorded one
        again when this is the checkpoint it was applied at (which predates it), never twice."""
        accum = self.cfg.grad_accum
        if not request.empty and not is_repeat(request, last):
            last = Honoured(request, step, step * accum, request.skip_steps * accum)
            dist.barrier()  # every rank has read the record
            if self.rt.is_main:
                record(self.cfg.run_dir, last)
        if last is None or not last.data_steps or last.resumed_step != step:
            return
        edit = Edit.skip(last.data_step, last.data_steps)
        if edit in self.loader.plan.edits:
            return  # in the checkpoint's data plan already
        self.loader.apply(edit)
        if self.rt.is_main:
            log.info("skipping the data of %d steps (%d global data steps) from step %d: step %d reads what "
                     "step %d would have read", last.request.skip_steps, last.data_steps, step + 1, step + 1,
                     step + 1 + last.request.skip_steps)

    def _load(self, step: int, loop: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(loop["scheduler"])
        # Same world size: each rank continues its own stream. Resized: every rank starts from the
        # job position that any old rank's cursor carries (rank 0's), in the new dealing.
        src = self.rt.rank if loop["world_size"] == self.rt.world_size else 0
        self.loader.load_state_dict(loop["data"][src])
        if self.rt.rank < len(loop["rng"]):
            checkpoint.restore_rng(loop["rng"][self.rt.rank])
        self.state = LoopState(**{k: loop[k] for k in LoopState.__dataclass_fields__})
        self.resumed_from = step
        if self.rt.is_main:
            dropped = rewind(self.cfg.run_dir / "metrics.jsonl", step)
            log.info("resumed from checkpoint step %d (saved by %d ranks, now %d); next step %d%s", step,
                     loop["world_size"], self.rt.world_size, step + 1,
                     f"; dropped {dropped} metrics lines of redone steps" if dropped else "")

    def _reopen(self, force_continue: bool) -> None:
        """A finished run launched to go further (``__main__.extends``): no longer complete."""
        s = self.state
        if force_continue and s.stop_reason is not None and s.step < self.cfg.max_steps:
            log.info("--force-continue: the run stopped early at step %d; training on to step %d", s.step,
                     self.cfg.max_steps)
            s.stop_reason, s.bad_evals = None, 0
        if self.rt.is_main and s.stop_reason is None and s.step < self.cfg.max_steps:
            (self.cfg.run_dir / MARKER).unlink(missing_ok=True)  # a kill from now on leaves a run to resume

    # ---- reporting and the end -----------------------------------------------------------
    def _report(self, record: dict[str, Any]) -> None:
        if not self.rt.is_main:
            return
        assert self.jsonl is not None
        self.jsonl.write(record)
        if self.tracking is not None:
            self.tracking.log(record)  # after metrics.jsonl: a step the tracker missed is sent from there
        step = record["step"]
        if step == 1 or step % self.cfg.log_every == 0 or step == self.cfg.max_steps or self.resumed_from == step - 1:
            log.info("step %d/%d | loss %.4f | lr %.2e | %.0f tokens/s | data wait %.1f%% | %.3f s/step",
                     step, self.cfg.max_steps, record["loss"], record["lr"], record["tokens_per_s"],
                     100 * record["data_wait_fraction"], record["step_s"])

    def _finish(self) -> int:
        """Export the best checkpoint, then clean up and mark the run complete (rank 0)."""
        ok = [False]
        if self.rt.is_main:
            ok[0] = self._export_and_mark()
        dist.broadcast_object_list(ok, src=0)
        return 0 if ok[0] else 1

    def _export_and_mark(self) -> bool:
        s, run_dir = self.state, self.cfg.run_dir
        chosen = s.best_step if s.best_step is not None else s.step
        meta = {**self.meta, "step": chosen, "eval_loss": s.best_eval}
        try:
            path = self._export(chosen, meta)
        except Exception as err:  # noqa: BLE001 -- any failure keeps every checkpoint
            log.error("exporting checkpoint step %d failed (%s: %s); every checkpoint is kept, relaunch to retry",
                      chosen, type(err).__name__, err)
            return False
        tracked = self._upload(path.parent, meta)
        if tracked is None:
            return False
        # only now: the best is exported, and uploaded where a tracker is configured
        removed = checkpoint.prune(self.ckpt_root, self.cfg.checkpoint.keep)
        marker = {"reason": s.stop_reason or "max_steps", "step": s.step, "best_step": s.best_step,
                  "best_eval_loss": s.best_eval, "final_model": str(path), "tracking": tracked,
                  "finished": time.time()}
        tmp = run_dir / f"{MARKER}.tmp"
        tmp.write_text(json.dumps(marker, indent=1))
        os.replace(tmp, run_dir / MARKER)
        log.info("run complete (%s at step %d): exported step %d to %s; removed checkpoints %s",
                 marker["reason"], s.step, chosen, path, removed or "none")
        return True

    def _export(self, step: int, meta: dict[str, Any]) -> Path:
        """Export checkpoint ``step`` to ``final/``; an extended run whose best is still the step an earlier
        finish exported keeps that export (that finish removed its checkpoint once it was exported)."""
        final, ckpt = self.cfg.run_dir / "final", checkpoint.step_dir(self.ckpt_root, step)
        if not ckpt.exists() and (final / CONFIG_FILE).is_file():
            if json.loads((final / CONFIG_FILE).read_text()).get("step") == step:
                log.info("the best checkpoint (step %d) is the one exported before; keeping %s", step, final)
                return final / MODEL_FILE
        return export(ckpt, final, self.cfg.model, meta, self.tokenizer_file)

    def _upload(self, directory: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
        """Upload the export as the tracker run's model: what ``COMPLETE`` records, or None when it failed."""
        backend = self.cfg.tracking.backend
        if self.tracking is None:
            return {"backend": backend, "uploaded": False}
        try:
            ref = self.tracking.upload(directory, meta)
        except TrackingError as err:
            log.error("%s. The model was NOT uploaded: every checkpoint is kept and the run is not complete; "
                      "relaunch the same command once the tracker is up to retry the upload (it does not train "
                      "again)", err)
            return None
        return {"backend": backend, "run_id": self.tracking.run_id, "artifact": ref, "uploaded": True}
