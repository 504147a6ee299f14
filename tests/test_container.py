"""The data server's image, built and run for real with podman (scripts/container_test.sh): an
air-gapped build from a host wheelhouse on a local stand-in base image, then the HEALTHCHECK,
/metrics, a TLS + token client on the host, mounted config and corpus, non-root, a writable cache
volume, and SIGTERM exiting 0 within the grace period."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "container_test.sh"
TOOLS = ("podman", "podman-compose", "runc", "debootstrap")
PACKAGES = ("podman", "podman-compose", "runc", "debootstrap")
SCRIPT_TIMEOUT_S = 420  # measured: 120-210 s with no base image cached, ~70 s with it; a stuck podman must not hang CI


def apt_install(packages: tuple[str, ...]) -> None:
    """Installs missing tools from apt; a machine where that cannot happen fails the test with the reason."""
    if os.geteuid() != 0:
        pytest.fail(f"the container test needs root (rootful podman, apt-get install {' '.join(packages)})")
    if shutil.which("apt-get") is None:
        pytest.fail(f"no apt-get to install {' '.join(packages)}: install them, then run again")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}")


@pytest.fixture(scope="module")
def podman_tools() -> None:
    if not all(shutil.which(tool) for tool in TOOLS):
        apt_install(PACKAGES)
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"still missing after apt-get install: {missing}")


@pytest.mark.slow
@pytest.mark.container
def test_image_builds_air_gapped_and_serves_tls_clients_through_compose(podman_tools):
    start = time.monotonic()
    env = {**os.environ, "PYTHON": sys.executable}
    try:
        done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=SCRIPT_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{SCRIPT.name} ran past {SCRIPT_TIMEOUT_S} s; its output:\n{err.stderr or ''}")
    assert done.returncode == 0, f"{SCRIPT.name} exited {done.returncode}:\n{done.stderr[-6000:]}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("figures: ")]
    assert lines, f"no figures printed:\n{done.stdout}\n{done.stderr[-3000:]}"
    figures = json.loads(lines[-1].removeprefix("figures: "))
    assert figures["stop_s"] < 15 and figures["image_mb"] > 0
    print(f"container: {figures}, test wall {time.monotonic() - start:.0f} s")
