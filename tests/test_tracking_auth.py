"""MLflow behind authentication: a real ``mlflow server --app-name basic-auth`` (users created through its
admin API), credentials from the environment and from the config, and the errors without them."""

from __future__ import annotations

import base64
import json
import re
import secrets
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_tracking import MlflowServer, read_until
from tests.test_trainer import ENV, ROOT, checkpoints, command, metrics, train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADMIN_PASSWORD = secrets.token_urlsafe(16)
#: Per session: the test asserts that these strings are found in no file and no log line.
PASSWORD = f"pw-{secrets.token_urlsafe(12)}"
NEW_PASSWORD = f"pw-{secrets.token_urlsafe(12)}"
VIEWER_PASSWORD = f"pw-{secrets.token_urlsafe(12)}"
#: No retries (a 401 is not retried by MLflow anyway), short timeouts.
ARGS = ["tracking.backend=mlflow", "tracking.experiment=auth", "tracking.retries=0", "tracking.timeout_s=10"]


def ensure_flask_wtf() -> None:
    """The basic-auth app needs Flask-WTF (``mlflow[auth]``); installed here when missing."""
    try:
        import flask_wtf  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "Flask-WTF>=1.1,<2"], check=True, timeout=600)


def call(uri: str, path: str, body: dict[str, Any], user: str, password: str, method: str = "POST") -> Any:
    """One REST call to the tracking server with basic-auth credentials."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    req = urllib.request.Request(f"{uri}{path}", data=json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"{}")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """The basic-auth MLflow server, with users ``trainer`` (owns experiment ``auth``) and ``viewer`` (the
    default permission only: READ)."""
    ensure_flask_wtf()
    workdir = tmp_path_factory.mktemp("mlflow-auth")
    ini = workdir / "auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{workdir / 'users.db'}\n"
                   f"admin_username = admin\nadmin_password = {ADMIN_PASSWORD}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    tracker = MlflowServer(workdir, ("--app-name", "basic-auth"), {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
    try:
        tracker.start()
        for user, password in (("trainer", PASSWORD), ("viewer", VIEWER_PASSWORD)):
            call(tracker.uri, "/api/2.0/mlflow/users/create", {"username": user, "password": password},
                 "admin", ADMIN_PASSWORD)
        call(tracker.uri, "/api/2.0/mlflow/experiments/create", {"name": "auth"}, "trainer", PASSWORD)
        yield tracker
    finally:
        tracker.kill()


@pytest.fixture(scope="module")
def server(module_servers: Any) -> str:
    return module_servers(None).address


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The trainer's environment with no MLflow credentials of the caller's."""
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delitem(ENV, var, raising=False)
    return ENV


def errors(out: str) -> list[str]:
    return [line for line in out.splitlines() if " ERROR " in line]


def test_without_credentials_the_run_fails_at_start_with_one_line_naming_401(
        server: str, auth_server: MlflowServer, env: dict[str, str], tmp_path: Path) -> None:
    out = train(1, server, tmp_path / "run", "--max-steps", "2", *ARGS, f"tracking.uri={auth_server.uri}", ok=False)
    [line] = errors(out)
    assert "starting the run failed (HTTP 401: not authenticated, no credentials were given; set " \
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in line, out[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not metrics(tmp_path / "run")


def test_a_user_without_write_permission_fails_at_start_with_403(
        server: str, auth_server: MlflowServer, env: dict[str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(env, "MLFLOW_TRACKING_USERNAME", "viewer")
    monkeypatch.setitem(env, "MLFLOW_TRACKING_PASSWORD", VIEWER_PASSWORD)
    out = train(1, server, tmp_path / "run", "--max-steps", "2", *ARGS, f"tracking.uri={auth_server.uri}", ok=False)
    [line] = errors(out)
    assert "HTTP 403: permission denied: user 'viewer' (MLFLOW_TRACKING_USERNAME) may not write to experiment " \
        "'auth'; ask the tracker's admin for EDIT permission" in line, out[-3000:]
    assert VIEWER_PASSWORD not in out


def test_credentials_log_and_upload_and_a_changed_password_keeps_the_checkpoints(
        server: str, auth_server: MlflowServer, env: dict[str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Config credentials (tracking.username/password) until the admin changes the password mid-run: the run
    trains on, the upload fails with 401 and keeps every checkpoint; a relaunch with the new password (from
    the environment) uploads without training. No password is written anywhere."""
    run_dir = tmp_path / "run"
    args = ["--max-steps", "12", "--checkpoint-every", "4", "eval.every=4", "checkpoint.keep=1", *ARGS,
            f"tracking.uri={auth_server.uri}", "tracking.retry_after_s=0"]
    proc = subprocess.Popen(command(1, server, run_dir, *args, "tracking.username=trainer",
                                    f"tracking.password={PASSWORD}"),
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    try:
        assert proc.stderr is not None
        read_until(proc.stderr, r"step 3/12", out)
        proc.send_signal(signal.SIGSTOP)  # the change lands before step 4, whatever the machine's speed
        try:
            call(auth_server.uri, "/api/2.0/mlflow/users/update-password",
                 {"username": "trainer", "password": NEW_PASSWORD}, "admin", ADMIN_PASSWORD, "PATCH")
        finally:
            proc.send_signal(signal.SIGCONT)
        out.extend(proc.stderr)
        assert proc.wait(240) == 1, "".join(out)[-4000:]
    finally:
        proc.kill()
    text = "".join(out)
    assert re.search(r"WARNING trainer.tracking: tracker mlflow at \S+: logging steps 4-4 failed \(HTTP 401: not "
                     r"authenticated, user 'trainer' \(tracking.username\) was refused: check the password", text)
    [line] = errors(text)
    # the upload sends the queued steps first: that is the call refused
    assert re.search(r"(logging steps 4-12|uploading the model) .*failed \(HTTP 401: .*The model was NOT uploaded",
                     line), line
    lines = metrics(run_dir)
    assert [r["step"] for r in lines] == list(range(1, 13))  # the refusals did not stop training
    evals = {r["step"]: r["eval_loss"] for r in lines if "eval_loss" in r}
    best = min(evals, key=evals.get)
    assert set(checkpoints(run_dir)) == {best, 12} and not (run_dir / "COMPLETE").exists()

    monkeypatch.setitem(env, "MLFLOW_TRACKING_USERNAME", "trainer")
    monkeypatch.setitem(env, "MLFLOW_TRACKING_PASSWORD", NEW_PASSWORD)
    again = train(1, server, run_dir, *args)
    assert not re.search(r"step \d+/12", again), "the relaunch trained again"
    marker = json.loads((run_dir / "COMPLETE").read_text())
    assert marker["tracking"]["uploaded"] is True and checkpoints(run_dir) == [12]

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", NEW_PASSWORD)
    tracker = MlflowClient(tracking_uri=auth_server.uri)
    run_id = marker["tracking"]["run_id"]
    points = tracker.get_metric_history(run_id, "loss")
    assert sorted(p.step for p in points) == list(range(1, 13))  # each step once, the refused ones included
    assert {Path(f.path).name for f in tracker.list_artifacts(run_id, "model")} >= {"model.pt", "config.json"}
    params = tracker.get_run(run_id).data.params
    assert params["tracking.username"] == "trainer" and params["tracking.password"] == "**********"

    for secret in (PASSWORD, NEW_PASSWORD):  # in no log line, no file of the run, nowhere on the tracker
        assert secret not in text and secret not in again
        assert secret.encode() not in (auth_server.workdir / "mlflow.log").read_bytes()
        for path in run_dir.rglob("*"):
            assert not path.is_file() or secret.encode() not in path.read_bytes(), path
