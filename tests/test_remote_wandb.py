"""``trainer.generate --model wandb:ENTITY/PROJECT/NAME:VERSION``: what can be checked without W&B's servers.

The lookup and download use the real ``wandb`` public API (``wandb.Api().artifact(...).download()``); no W&B
server is reachable here, so these tests cover the URI, the cache (a version fetched before is used without
any tracker call) and the errors of a real ``wandb.Api`` against an unreachable base URL. A real download is
NOT verified (see README, Tracking)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_generate import exported  # noqa: F401 -- fixture
from trainer.remote import WandbRef, cache_path, parse_wandb, resolve

ROOT = Path(__file__).resolve().parents[1]


def dead_url() -> str:
    """A base URL where nothing listens (the port is released when the block ends)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_the_uri_names_entity_project_name_and_version() -> None:
    ref = parse_wandb("wandb:team-a/llm.runs/model-1x2y3z:v12")
    assert ref == WandbRef("team-a", "llm.runs", "model-1x2y3z", "v12") and ref.pinned
    assert not parse_wandb("wandb:team/proj/model-abc:latest").pinned
    for bad in ("wandb:proj/model-abc:v1", "wandb:team/proj/model-abc", "wandb:a/b/c/d:v1", "wandb:team/proj/m:v1 x"):
        with pytest.raises(ValueError, match="expected wandb:ENTITY/PROJECT/NAME:VERSION"):
            resolve(bad)


def test_a_cached_version_is_used_without_asking_wandb(exported: Path, tmp_path: Path) -> None:  # noqa: F811
    """The cache entry a fetch makes (the export's files under the URI's key): generate reads it, with
    the tracker's base URL pointing where nothing listens."""
    spec = "wandb:team/proj/model-abc:v3"
    shutil.copytree(exported.parent, cache_path(spec, tmp_path / "cache"))
    assert resolve(spec, tmp_path / "cache", dead_url()) == cache_path(spec, tmp_path / "cache")
    args = ["--greedy", "--max-new-tokens", "12", "--prompt", "def ", "--tracking-uri", dead_url()]
    start = time.monotonic()
    runs = [subprocess.run([sys.executable, "-m", "trainer.generate", "--model", model, *args,
                            "--cache-dir", str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True,
                           timeout=120) for model in (spec, str(exported))]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.startswith("def ")  # the same weights
    assert time.monotonic() - start < 120


def test_an_alias_is_looked_up_and_an_unreachable_wandb_fails_naming_it(exported: Path, tmp_path: Path,  # noqa: F811
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An alias (``latest``) can move, so even with a version cached it asks W&B: a real ``wandb.Api``
    against a closed port, with and without an API key."""
    shutil.copytree(exported.parent, cache_path("wandb:team/proj/model-abc:v3", tmp_path))
    url = dead_url()
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # no login of the machine's
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(ValueError, match=f"cannot fetch wandb:team/proj/model-abc:latest from W&B at {url}: "
                                         r"UsageError: .*set WANDB_API_KEY"):
        resolve("wandb:team/proj/model-abc:latest", tmp_path, url, timeout_s=3)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"cannot fetch wandb:team/proj/model-abc:v4 from W&B at {url}: "
                                         f"AuthenticationError: .*{url}"):
        resolve("wandb:team/proj/model-abc:v4", tmp_path, url, timeout_s=3)  # not cached: asks W&B
    assert time.monotonic() - start < 60
    assert not list(tmp_path.glob("*.tmp"))  # a failed fetch leaves no partial cache entry
