"""Experiment tracking end to end: 2 gloo ranks against a real data server and a real MLflow tracking
server (``mlflow server``, SQLite store, served artifacts), and the real ``wandb`` in offline mode."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_trainer import ENV, ROOT, checkpoints, command, metrics, train
from trainer.export import load_exported
from trainer.generate import decode, encode
from trainer.generate import generate as greedy
from trainer.remote import resolve

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The tracker must fail fast once it is down (no retries) so the test sees the failure quickly.
MLFLOW_ARGS = ["tracking.backend=mlflow", "tracking.experiment=tests", "tracking.retries=0", "tracking.timeout_s=10"]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend store and a local artifact root served over
    HTTP (so uploads go through the server and fail when it is down). Restarts on the same port."""

    def __init__(self, workdir: Path, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.workdir, self.extra_args, self.env = workdir, list(extra_args), dict(env or {})
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, deadline_s: float = 180.0) -> MlflowServer:
        return self.launch().wait_ready(deadline_s)

    def launch(self) -> MlflowServer:
        """Start the process without waiting (it takes tens of seconds to import on a busy machine)."""
        log = (self.workdir / "mlflow.log").open("a")
        mlflow = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
             "--artifacts-destination", str(self.workdir / "artifacts"), *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env})
        return self

    def wait_ready(self, deadline_s: float = 180.0) -> MlflowServer:
        assert self.proc is not None
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:  # poll with a deadline: it is up once /health answers
            assert self.proc.poll() is None, f"mlflow server exited:\n{self.log_tail()}"
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"mlflow server not up within {deadline_s}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server and its workers (a tracker that is suddenly gone)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def log_tail(self) -> str:
        return (self.workdir / "mlflow.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def server(module_servers: Any) -> str:
    return module_servers(None).address


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B run file (``run-ID.wandb``): a 7-byte header, then LevelDB-log records of
    protobuf ``Record`` messages in 32 KiB blocks, written by the real wandb package."""
    from wandb.proto import wandb_internal_pb2 as wpb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = wpb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def wandb_run(path: Path) -> tuple[dict[int, dict[str, float]], list[Any]]:
    """``step -> logged values`` and the artifact records of one offline run file."""
    steps: dict[int, dict[str, float]] = {}
    artifacts = []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            values = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            assert record.history.step.num not in steps, f"step {record.history.step.num} logged twice"
            steps[record.history.step.num] = values
        elif kind == "artifact":
            artifacts.append(record.artifact)
    return steps, artifacts


def test_wandb_offline_logs_steps_and_the_model_and_a_resume_continues_the_run(
        server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_booting: MlflowServer) -> None:
    monkeypatch.setitem(ENV, "WANDB_MODE", "offline")
    run_dir = tmp_path / "wb"
    common = ["--checkpoint-every", "2", "eval.every=2", "tracking.backend=wandb", "tracking.project=tests"]
    # one rank: only rank 0 talks to the tracker (the MLflow tests run 2 ranks); saves two launchers' start-up
    train(1, server, run_dir, "--max-steps", "4", *common)
    run_id = run_id_of(run_dir, "wandb")
    # a larger --max-steps extends the finished run: the same tracker run continues
    out = train(1, server, run_dir, "--max-steps", "6", *common)
    assert "extending run" in out and "resumed from checkpoint step 4" in out
    assert run_id_of(run_dir, "wandb") == run_id

    files = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2, list((run_dir / "wandb").iterdir())
    (first, art1), (second, art2) = wandb_run(files[0]), wandb_run(files[1])
    assert sorted(first) == [1, 2, 3, 4] and sorted(second) == [5, 6]  # appended, nothing twice
    lines = {r["step"]: r for r in metrics(run_dir)}
    for step, values in {**first, **second}.items():
        assert values["loss"] == pytest.approx(lines[step]["loss"]) and "grad_norm" in values
        assert ("eval_loss" in values) == (step % 2 == 0)
    for artifacts in (art1, art2):
        assert [(a.type, a.name) for a in artifacts] == [("model", f"model-{run_id}")]
        assert {e.path for e in artifacts[0].manifest.contents} == {"model.pt", "config.json"}
    evals = {s: r["eval_loss"] for s, r in lines.items() if "eval_loss" in r}
    assert json.loads(art2[0].metadata)["step"] == min(evals, key=evals.get)
    marker = json.loads((run_dir / "COMPLETE").read_text())
    assert marker["tracking"]["uploaded"] is True and marker["tracking"]["run_id"] == run_id


def test_tracking_config_errors_name_the_field(tmp_path: Path) -> None:
    for override, expected in (("tracking.backend=neptune", "tracking.backend: Value error, must be one of none, "
                                "mlflow, wandb"), ("tracking.backend=mlflow", "tracking.uri: backend 'mlflow' needs")):
        proc = subprocess.run([sys.executable, "-m", "trainer", "--run-dir", str(tmp_path / "r"), override], cwd=ROOT,
                              env=ENV, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr


@pytest.mark.parametrize("tracker", ["closed", "silent"])
def test_an_unreachable_tracker_fails_at_start_naming_it(server: str, tmp_path: Path, tracker: str) -> None:
    """A closed port (refused at once) and a listener that never answers (the request times out)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        if tracker == "silent":
            sock.listen(8)  # connections complete in the kernel's backlog; nobody reads or answers
        else:
            sock.close()  # nobody listens there
        start = time.monotonic()
        out = train(1, server, tmp_path / "run", "--max-steps", "2", *MLFLOW_ARGS,
                    f"tracking.uri=http://127.0.0.1:{port}", "tracking.timeout_s=2", ok=False)
    assert f"tracker mlflow at http://127.0.0.1:{port}: starting the run failed" in out
    assert "check tracking.uri and that the tracker is up" in out
    assert ("ReadTimeoutError" in out) == (tracker == "silent") and ("refused" in out) == (tracker == "closed")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not metrics(tmp_path / "run")
    assert time.monotonic() - start < 60  # bounded by tracking.timeout_s, not MLflow's minutes of retries


def client(tracker: MlflowServer) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracker.uri)


def history(tracker: MlflowServer, run_id: str, key: str) -> dict[int, float]:
    """``step -> value`` of a metric, asserting no step was logged twice."""
    points = client(tracker).get_metric_history(run_id, key)
    counts = Counter(p.step for p in points)
    twice = [s for s, n in counts.items() if n > 1]
    assert not twice, f"{key} logged twice at steps {twice}"
    return {p.step: p.value for p in points}


def run_id_of(run_dir: Path, backend: str) -> str:
    return json.loads((run_dir / "tracking.json").read_text())[backend]["run_id"]


@pytest.fixture(scope="module")
def early_run(server: str, mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 2-rank run tracked in MLflow that stops early; its run directory and output."""
    run_dir = tmp_path_factory.mktemp("early")
    # lr 0: every eval ties, so the best (the first) is not the latest; early stop after 2 evals without gain
    out = train(2, server, run_dir, "--max-steps", "50", "--checkpoint-every", "1", "optim.lr=0", "eval.every=2",
                "eval.patience=2", "checkpoint.keep=2", *MLFLOW_ARGS, f"tracking.uri={mlflow_server.uri}",
                "tracking.run_name=early", "tracking.tags={team: data}")
    return run_dir, out


def test_mlflow_gets_every_step_and_the_best_checkpoint_then_cleanup(early_run: tuple[Path, str],
                                                                    mlflow_server: MlflowServer,
                                                                    tmp_path: Path) -> None:
    run_dir, out = early_run
    run_id = run_id_of(run_dir, "mlflow")
    lines = metrics(run_dir)
    assert [r["step"] for r in lines] == list(range(1, 7))
    loss = history(mlflow_server, run_id, "loss")
    assert loss == pytest.approx({r["step"]: r["loss"] for r in lines})
    assert sorted(history(mlflow_server, run_id, "grad_norm")) == list(range(1, 7))
    for key in ("lr", "tokens_per_s", "data_wait_fraction"):
        assert sorted(history(mlflow_server, run_id, key)) == list(range(1, 7)), key
    evals = history(mlflow_server, run_id, "eval_loss")
    assert sorted(evals) == [2, 4, 6]

    run = client(mlflow_server).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "early" and run.data.tags["team"] == "data"
    assert run.data.params["eval.patience"] == "2" and run.data.tags["tokenfeed.world_size"] == "2"
    names = {Path(f.path).name for f in client(mlflow_server).list_artifacts(run_id, "model")}
    assert names == {"model.pt", "config.json"}
    local = client(mlflow_server).download_artifacts(run_id, "model/config.json", str(tmp_path))
    config = json.loads(Path(local).read_text())
    assert config["step"] == 2 and config["eval_loss"] == pytest.approx(min(evals.values()))
    assert config["metadata"]["world_size"] == 2 and config["metadata"]["dataset_fingerprint"]

    marker = json.loads((run_dir / "COMPLETE").read_text())
    assert (marker["reason"], marker["best_step"]) == ("early_stop", 2)
    assert marker["tracking"] == {"backend": "mlflow", "run_id": run_id, "artifact": f"runs:/{run_id}/model",
                                  "uploaded": True}
    assert checkpoints(run_dir) == [5, 6]  # the best (2) went only once uploaded
    assert f"uploaded {run_dir / 'final'} to mlflow run {run_id} as runs:/{run_id}/model" in out
    again = train(1, mlflow_server.uri.replace("http://", ""), run_dir)  # answers before touching any server
    assert f"already finished (early_stop at step 6; final model {run_dir / 'final' / 'model.pt'}, uploaded as " \
        f"runs:/{run_id}/model)" in again


def test_mlflow_down_at_the_end_keeps_checkpoints_and_a_relaunch_uploads(server: str, mlflow_server: MlflowServer,
                                                                         tmp_path: Path) -> None:
    run_dir = tmp_path / "outage"
    args = ["--max-steps", "16", "--checkpoint-every", "4", "eval.every=4", "checkpoint.keep=1", *MLFLOW_ARGS,
            f"tracking.uri={mlflow_server.uri}"]
    proc = subprocess.Popen(command(2, server, run_dir, *args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        out = []
        for line in proc.stderr:
            out.append(line)
            if re.search(r"step 3/16", line):
                mlflow_server.kill()  # the tracker goes away mid-run, before the upload
                break
        out.extend(proc.stderr)
        assert proc.wait(240) == 1, "".join(out)[-4000:]
    finally:
        proc.kill()
        mlflow_server.kill()
    text = "".join(out)
    assert "The model was NOT uploaded: every checkpoint is kept" in text
    assert not (run_dir / "COMPLETE").exists()
    lines = metrics(run_dir)
    assert [r["step"] for r in lines] == list(range(1, 17))
    evals = {r["step"]: r["eval_loss"] for r in lines if "eval_loss" in r}
    best = min(evals, key=evals.get)
    assert set(checkpoints(run_dir)) == {best, 16}  # nothing removed: the best awaits its upload
    run_id = run_id_of(run_dir, "mlflow")
    check_metadata(run_dir / "checkpoints" / "step_00000016", server)

    mlflow_server.start()
    before = (run_dir / "metrics.jsonl").read_text()
    out2 = train(2, server, run_dir, *args)
    assert not re.search(r"step \d+/16", out2), "the relaunch trained again"
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert run_id_of(run_dir, "mlflow") == run_id
    # the steps the first launch could not send went now, each exactly once
    assert history(mlflow_server, run_id, "loss") == pytest.approx({r["step"]: r["loss"] for r in lines})
    assert history(mlflow_server, run_id, "eval_loss") == pytest.approx(evals)
    local = client(mlflow_server).download_artifacts(run_id, "model/config.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["step"] == best
    marker = json.loads((run_dir / "COMPLETE").read_text())
    assert marker["reason"] == "max_steps" and marker["tracking"]["uploaded"] is True
    assert checkpoints(run_dir) == [16]
    assert client(mlflow_server).get_run(run_id).info.status == "FINISHED"


def read_until(stream: Any, pattern: str, out: list[str]) -> None:
    """Read ``stream`` line by line into ``out`` until a line matches ``pattern``."""
    for line in stream:
        out.append(line)
        if re.search(pattern, line):
            return
    raise AssertionError(f"no line matched {pattern!r}:\n{''.join(out)[-4000:]}")


def test_mlflow_down_mid_run_training_goes_on_and_the_queue_is_sent_when_it_is_back(
        server: str, mlflow_server: MlflowServer, tmp_path: Path) -> None:
    """The tracker dies at step 3 and comes back mid-run: every step arrives once, without a relaunch. A queue
    longer than tracking.max_queued_steps is sent from metrics.jsonl."""
    run_dir = tmp_path / "blip"
    proc = subprocess.Popen(command(1, server, run_dir, "--max-steps", "40", "eval.every=10", *MLFLOW_ARGS,
                                    f"tracking.uri={mlflow_server.uri}", "tracking.retry_after_s=0.5",
                                    "tracking.max_queued_steps=3"),
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    try:
        assert proc.stderr is not None
        read_until(proc.stderr, r"step 3/40", out)
        mlflow_server.kill()
        read_until(proc.stderr, r"training goes on: \d+ steps queued", out)
        read_until(proc.stderr, r"the queue now lives in .*metrics.jsonl only", out)
        proc.send_signal(signal.SIGSTOP)  # hold the run while the tracker restarts (seconds)
        try:
            mlflow_server.start()
        finally:
            proc.send_signal(signal.SIGCONT)
        out.extend(proc.stderr)
        assert proc.wait(240) == 0, "".join(out)[-4000:]
    finally:
        proc.kill()
    text = "".join(out)
    back = re.search(r"tracking: mlflow answers again; sent the steps (\d+)-(\d+) queued during (\d+) failed", text)
    assert back and int(back.group(1)) <= 4 and int(back.group(3)) >= 1, text[-4000:]
    lines = metrics(run_dir)
    assert [r["step"] for r in lines] == list(range(1, 41))
    run_id = run_id_of(run_dir, "mlflow")
    assert history(mlflow_server, run_id, "loss") == pytest.approx({r["step"]: r["loss"] for r in lines})
    marker = json.loads((run_dir / "COMPLETE").read_text())
    assert marker["tracking"]["uploaded"] is True
    assert client(mlflow_server).get_run(run_id).info.status == "FINISHED"


def generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.generate", "--greedy", "--max-new-tokens", "24",
                           "--prompt", "def ", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)


def test_generate_fetches_a_tracked_model_once_then_uses_the_cache(early_run: tuple[Path, str],
                                                                    mlflow_server: MlflowServer, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, _ = early_run
    spec = f"mlflow:runs:/{run_id_of(run_dir, 'mlflow')}/model"
    model, config = load_exported(run_dir / "final")
    expected = "def " + decode(greedy(model, encode("def "), 24, top_k=1, eos_id=config["eos_id"])) + "\n"
    first = generate("--model", spec, "--tracking-uri", mlflow_server.uri, "--cache-dir", str(tmp_path / "cache"))
    assert first.returncode == 0, first.stderr
    assert first.stdout == expected  # the same weights: greedy decoding gives the same text
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nobody listens there once the block ends
    again = generate("--model", spec, "--tracking-uri", dead, "--cache-dir", str(tmp_path / "cache"))
    assert again.returncode == 0 and again.stdout == expected, again.stderr  # from the cache, no tracker call
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once: no backoff to wait out
    with pytest.raises(ValueError, match=f"cannot fetch runs:/.* from MLflow at {dead}"):
        resolve(spec, tmp_path / "empty", dead)


def check_metadata(ckpt: Path, server: str) -> None:
    """A checkpoint's manifest says what made it: versions, world size, the server and the dataset."""
    import torch

    from client import StreamingDataset

    meta = json.loads((ckpt / "manifest.json").read_text())["metadata"]
    answer = StreamingDataset(server, "stdlib", seq_len=64, batch_size=4).describe_server()
    assert meta["dataset_fingerprint"] == answer.datasets[0].fingerprint != ""
    assert meta["data_server_version"] == answer.server_version != ""
    assert meta["world_size"] == 2 and meta["torch_version"] == torch.__version__
    assert meta["python_version"] == ".".join(map(str, sys.version_info[:3]))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert meta["git_commit"].split("+")[0] == head
    assert re.fullmatch(r"\d+\.\d+.*", meta["tokenfeed_version"])
