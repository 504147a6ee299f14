"""Experiment tracking from rank 0: MLflow or W&B behind one small interface.

The loop talks to ``TrackedRun``. It keeps the tracker run's id and the last step the tracker
confirmed in ``RUN_DIR/tracking.json``: a resumed run continues the same tracker run, and a step is
sent once (a step redone after a resume was already sent, so it is skipped). Steps that could not be
sent (tracker down) stay pending, training goes on, and they go with a later step, or with the next
launch; ``metrics.jsonl`` is the durable queue (a long outage keeps only ``tracking.max_queued_steps`` in
memory and sends the rest from there). The backends import their packages only when chosen.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

from trainer.config import TrackingConfig, TrainConfig

log = logging.getLogger(__name__)

STATE_FILE = "tracking.json"
#: The model artifact's directory (MLflow: ``runs:/RUN_ID/model``) and W&B artifact type.
ARTIFACT_DIR = "model"
#: The fields of a metrics.jsonl record that go to the tracker.
METRIC_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "data_wait_fraction", "eval_loss", "step_s", "data_wait_s")
_T = TypeVar("_T")
Step = dict[str, float]  # "step", "time" and the METRIC_KEYS present


class TrackingError(RuntimeError):
    """A tracker call that failed (server down, timeout, refused); the message names the tracker."""


class Backend(Protocol):
    """One tracker. Every method may raise anything its client library raises."""

    def start(self, run_id: str | None, name: str) -> tuple[str, bool]:
        """Continue run ``run_id``, or create one when None; returns ``(run_id, created)``."""

    def log_config(self, params: dict[str, str]) -> None:
        """The run's flattened config (once, when the run is created)."""

    def log_metadata(self, meta: dict[str, Any]) -> None:
        """What this launch runs with (versions, world size, dataset identity); may change on resume."""

    def log_steps(self, steps: Sequence[Step]) -> None:
        """Metrics of these steps, in order; returns once the tracker has them."""

    def upload_model(self, directory: Path, meta: dict[str, Any]) -> str:
        """Upload the files of ``directory`` as the run's model; returns its reference once confirmed."""

    def finish(self, ok: bool) -> None:
        """Mark the run finished (or failed) and release the client."""


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return out


def to_step(record: dict[str, Any]) -> Step:
    """The tracked part of a metrics.jsonl record."""
    step: Step = {"step": float(record["step"]), "time": float(record.get("time", time.time()))}
    step.update({k: float(record[k]) for k in METRIC_KEYS if record.get(k) is not None})
    return step


class MlflowBackend:
    """An MLflow tracking server through ``MlflowClient`` (no global active run)."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path) -> None:
        # MLflow reads these per request; its defaults (7 retries, 120 s) would stall a run for
        # minutes on a tracker that is down. An explicit environment setting wins.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(cfg.timeout_s))))
        # MLflow reads credentials from the environment on every request (no other way in through
        # MlflowClient); the config's win. Only this process's environment: nothing is written out.
        for var, value in (("MLFLOW_TRACKING_USERNAME", cfg.username),
                           ("MLFLOW_TRACKING_PASSWORD", cfg.password and cfg.password.get_secret_value()),
                           ("MLFLOW_TRACKING_TOKEN", cfg.token and cfg.token.get_secret_value())):
            if value:
                os.environ[var] = value
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.client = MlflowClient(tracking_uri=cfg.uri)
        self.run_id = ""

    def start(self, run_id: str | None, name: str) -> tuple[str, bool]:
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return run_id, False
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(self.cfg.experiment)
        self.run_id = self.client.create_run(exp_id, run_name=name, tags=dict(self.cfg.tags)).info.run_id
        return self.run_id, True

    def log_config(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100], synchronous=True)

    def log_metadata(self, meta: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(f"tokenfeed.{k}", str(v)) for k, v in meta.items()]
        self.client.log_batch(self.run_id, tags=tags, synchronous=True)

    def log_steps(self, steps: Sequence[Step]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, s[k], int(s["time"] * 1000), int(s["step"])) for s in steps for k in METRIC_KEYS
                   if k in s]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000], synchronous=True)

    def upload_model(self, directory: Path, meta: dict[str, Any]) -> str:
        self.client.log_artifacts(self.run_id, str(directory), ARTIFACT_DIR)
        # confirmed = the server lists every file with its size (a partial upload is not confirmed)
        listed = {Path(f.path).name: f.file_size for f in self.client.list_artifacts(self.run_id, ARTIFACT_DIR)}
        for path in directory.iterdir():
            if path.is_file() and listed.get(path.name, -1) not in (path.stat().st_size, None):
                raise TrackingError(f"{path.name} is not in the run's {ARTIFACT_DIR}/ artifacts with "
                                    f"{path.stat().st_size} bytes after the upload (listed: {listed})")
        return f"runs:/{self.run_id}/{ARTIFACT_DIR}"

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class WandbBackend:
    """A W&B run (online, or offline with ``WANDB_MODE=offline``: files under ``RUN_DIR/wandb``)."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path) -> None:
        import wandb

        self.wandb, self.cfg, self.run_dir = wandb, cfg, run_dir
        self.run: Any = None

    def start(self, run_id: str | None, name: str) -> tuple[str, bool]:
        settings = self.wandb.Settings(console="off", silent=True, init_timeout=self.cfg.timeout_s)
        if self.cfg.uri:
            settings.base_url = self.cfg.uri
        self.run = self.wandb.init(project=self.cfg.project, name=name, id=run_id, resume="allow",
                                   dir=str(self.run_dir), settings=settings,
                                   tags=[f"{k}:{v}" if v else k for k, v in self.cfg.tags.items()])
        return self.run.id, run_id is None

    def log_config(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metadata(self, meta: dict[str, Any]) -> None:
        self.run.config.update({f"tokenfeed.{k}": v for k, v in meta.items()}, allow_val_change=True)

    def log_steps(self, steps: Sequence[Step]) -> None:
        for s in steps:
            self.run.log({k: s[k] for k in METRIC_KEYS if k in s}, step=int(s["step"]))

    def upload_model(self, directory: Path, meta: dict[str, Any]) -> str:
        name = f"model-{self.run.id}"
        artifact = self.wandb.Artifact(name, type=ARTIFACT_DIR, metadata=meta)
        artifact.add_dir(str(directory))
        logged = self.run.log_artifact(artifact, aliases=["best"])
        if self.run.offline:  # the artifact is in the run's local files (synced later): no version number yet
            return f"{self.cfg.project}/{name}:latest"
        logged.wait(timeout=round(self.cfg.timeout_s))
        # ENTITY/PROJECT/NAME:vN, what `trainer.generate --model wandb:...` takes (a version: cached for good)
        return f"{logged.entity}/{logged.project}/{name}:{logged.version}"

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


BACKENDS: dict[str, Callable[[TrackingConfig, Path], Backend]] = {"mlflow": MlflowBackend, "wandb": WandbBackend}


class TrackedRun:
    """Rank 0's tracker run: the step queue, the confirmed-step mark and the model upload."""

    def __init__(self, cfg: TrainConfig, backend: Backend) -> None:
        self.cfg, self.backend = cfg, backend
        self.name = cfg.tracking.backend
        self.state_path = cfg.run_dir / STATE_FILE
        self.run_id = ""
        self.logged_step = 0
        self.metrics_path = cfg.run_dir / "metrics.jsonl"
        self.pending: list[Step] = []
        #: the queue outgrew tracking.max_queued_steps: the steps after logged_step are read from metrics.jsonl
        self.spilled = False
        self.failures = 0  # failed sends since the tracker last answered
        self._next_try = 0.0

    @classmethod
    def open(cls, cfg: TrainConfig, meta: dict[str, Any], metrics_path: Path) -> TrackedRun:
        """Start or continue the run's tracker run and queue the steps it has not confirmed.

        Raises:
            TrackingError: the tracker could not be reached or refused the run.
        """
        run = cls(cfg, cls._call_static(cfg, "connecting", lambda: BACKENDS[cfg.tracking.backend](
            cfg.tracking, cfg.run_dir)))
        mine = run._read_state().get(run.name, {})
        try:
            run_id, created = run._call("starting the run", lambda: run.backend.start(
                mine.get("run_id"), cfg.tracking.run_name or cfg.run_dir.name))
        except TrackingError as err:
            if not mine.get("run_id"):
                raise
            raise TrackingError(f"{err}; this run directory continues tracker run {mine['run_id']} (in "
                                f"{run.state_path}): if that run is gone, remove the {run.name!r} entry to start "
                                "a new one") from None
        run.metrics_path = metrics_path
        run.run_id, run.logged_step = run_id, 0 if created else int(mine.get("logged_step", 0))
        run._write_state()  # before anything else: a relaunch must find this run, not make another
        if created:
            run._call("logging the config", lambda: run.backend.log_config(_flatten(cfg.model_dump(mode="json"))))
        run._call("logging the metadata", lambda: run.backend.log_metadata(meta))
        run.pending = run._backlog()
        log.info("tracking: %s run %s (%s)%s", run.name, run_id, "new" if created else "continued",
                 f"; sending {len(run.pending)} steps not sent before" if run.pending else "")
        run.flush()
        return run

    # ---- steps ---------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        """Queue a step's record (already in metrics.jsonl) and send the queue, unless a recent failure says
        to wait. A failure never raises: training goes on, the steps stay queued, the log says how many."""
        if record["step"] <= self.logged_step:
            return  # redone after a resume: the tracker has this step already
        if not self.spilled and len(self.pending) >= self.cfg.tracking.max_queued_steps:
            self.spilled = True  # bounded memory: metrics.jsonl holds them, flush reads them back
            self.pending.clear()
            log.warning("tracking: more than %d steps queued (tracking.max_queued_steps); the queue now lives in "
                        "%s only and is sent from there once the tracker answers", self.cfg.tracking.max_queued_steps,
                        self.metrics_path)
        if not self.spilled:
            self.pending.append(to_step(record))
        if time.monotonic() < self._next_try:
            return
        try:
            self.flush()
        except TrackingError as err:
            self.failures += 1
            wait = self.cfg.tracking.retry_after_s
            self._next_try = time.monotonic() + wait
            log.warning("%s; training goes on: %d steps queued (since step %d, all in metrics.jsonl), retrying in "
                        "%.0f s", err, int(record["step"]) - self.logged_step, self.logged_step + 1, wait)

    def flush(self) -> None:
        """Send the queued steps; the mark moves only once the tracker has them.

        Raises:
            TrackingError: the tracker did not take them (they stay queued).
        """
        first = self.logged_step + 1
        while self.spilled or self.pending:
            if self.spilled:  # read back the next stretch from metrics.jsonl
                self.pending = self._backlog()
                self.spilled = len(self.pending) > self.cfg.tracking.max_queued_steps
            if not self.pending:
                break
            batch = self.pending[:self.cfg.tracking.max_queued_steps]
            self._call(f"logging steps {int(batch[0]['step'])}-{int(batch[-1]['step'])}",
                       partial(self.backend.log_steps, batch))
            del self.pending[:len(batch)]
            self.logged_step = int(batch[-1]["step"])
            self._write_state()
        if self.failures:
            log.info("tracking: %s answers again; sent the steps %d-%d queued during %d failed tries", self.name,
                     first, self.logged_step, self.failures)
            self.failures = 0

    # ---- the end -------------------------------------------------------------------------
    def upload(self, directory: Path, meta: dict[str, Any]) -> str:
        """Send the queued steps, then upload ``directory`` as the model; its reference once confirmed.

        Raises:
            TrackingError: either failed; nothing local should be removed then.
        """
        self.flush()
        ref = self._call(f"uploading the model {directory}", lambda: self.backend.upload_model(directory, meta))
        log.info("tracking: uploaded %s to %s run %s as %s", directory, self.name, self.run_id, ref)
        return ref

    def close(self, ok: bool) -> None:
        """Finish the tracker run; a failure here is logged, never raised (the run's result stands)."""
        try:
            self._call("finishing the run", lambda: self.backend.finish(ok))
        except TrackingError as err:
            log.warning("%s", err)

    # ---- helpers -------------------------------------------------------------------------
    def _call(self, what: str, work: Callable[[], _T]) -> _T:
        return self._call_static(self.cfg, what, work)

    @staticmethod
    def _call_static(cfg: TrainConfig, what: str, work: Callable[[], _T]) -> _T:
        """Run a tracker call; any failure of the client library becomes a ``TrackingError`` naming it."""
        try:
            return work()
        except TrackingError:
            raise
        except Exception as err:  # noqa: BLE001 -- the tracker clients raise many types (HTTP, their own)
            where = f" at {cfg.tracking.uri}" if cfg.tracking.uri else ""
            status = http_status(err)
            hint = f"HTTP {status}: {_auth_hint(cfg.tracking, status)}; " if status in (401, 403) else ""
            raise TrackingError(f"tracker {cfg.tracking.backend}{where}: {what} failed ({hint}"
                                f"{type(err).__name__}: {_brief(err)})") from None

    def _backlog(self) -> list[Step]:
        """The steps of metrics.jsonl the tracker has not confirmed."""
        return [to_step(r) for r in _read_jsonl(self.metrics_path) if r.get("step", 0) > self.logged_step]

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as err:
            raise TrackingError(f"{self.state_path} is not valid JSON ({err}); remove it to start a new "
                                "tracker run") from None
        return state if isinstance(state, dict) else {}

    def _write_state(self) -> None:
        state = self._read_state()
        state[self.name] = {"run_id": self.run_id, "logged_step": self.logged_step}
        tmp = self.state_path.with_name(STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_path)


def http_status(err: BaseException) -> int | None:
    """The HTTP status of a tracker client's error, when it carries one (MLflow's ``MlflowException``,
    a ``requests`` ``HTTPError``, or a message saying ``error code 401``)."""
    getter = getattr(err, "get_http_status_code", None)
    response = getattr(err, "response", None)
    for status in (getter() if callable(getter) else None, getattr(response, "status_code", None)):
        if isinstance(status, int) and status not in (200, 500):  # MLflow's default for "no status" is 500
            return status
    found = re.search(r"\b(?:error code|status(?: code)?:?|HTTP) ?(401|403)\b", str(err))
    return int(found.group(1)) if found else None


def _auth_hint(cfg: TrackingConfig, status: int | None) -> str:
    """What to change after a 401 or 403 (never a secret: the user name and where it came from)."""
    if cfg.backend != "mlflow":
        return ("not authenticated: set WANDB_API_KEY (or `wandb login`)" if status == 401
                else "permission denied: the API key's user may not write to this project")
    user = cfg.username or os.environ.get("MLFLOW_TRACKING_USERNAME")
    source = "tracking.username" if cfg.username else "MLFLOW_TRACKING_USERNAME"
    if status == 401:
        given = (f"user {user!r} ({source}) was refused: check the password" if user else
                 "a token was refused" if os.environ.get("MLFLOW_TRACKING_TOKEN") else "no credentials were given")
        return (f"not authenticated, {given}; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                "MLFLOW_TRACKING_TOKEN, or tracking.username and tracking.password)")
    who = f"user {user!r} ({source})" if user else "these credentials"
    return (f"permission denied: {who} may not write to experiment {cfg.experiment!r}; ask the tracker's admin "
            "for EDIT permission, or choose another tracking.experiment")


def _brief(err: Exception, limit: int = 500) -> str:
    """An error's message on one line; a long one keeps its head (what failed) and tail (the root cause,
    e.g. urllib3's ``ReadTimeoutError`` or ``Connection refused`` at the end of MLflow's message)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-limit // 2:]}"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
