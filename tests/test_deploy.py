"""Deployment without a Docker engine: the Dockerfile, compose.yaml, Prometheus and Grafana files are
checked for the paths, ports and commands they rely on, and the container's entrypoint and
HEALTHCHECK run outside Docker with the image's environment."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import tomllib
import urllib.request
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ROOT, jsonl_config, make_documents, write_jsonl
from tokenfeed.v1 import tokenfeed_pb2 as pb
from tokenfeed.v1 import tokenfeed_pb2_grpc as pb_grpc

DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "tokenfeed.json"
TOKENFEED_SERVICE = "tokenfeed.v1.TokenFeed"


# ---- parsing helpers -----------------------------------------------------------------------------
def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last:]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in final_stage():
        if word == "ENV":
            env.update(part.split("=", 1) for part in shlex.split(args))
    return env


def copies() -> list[tuple[list[str], list[str], str]]:
    """``(flags, sources, destination)`` of every COPY."""
    out = []
    for word, args in instructions():
        if word == "COPY":
            parts = shlex.split(args)
            flags = [p for p in parts if p.startswith("--")]
            paths = [p for p in parts if not p.startswith("--")]
            out.append((flags, paths[:-1], paths[-1]))
    return out


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches the path or a parent wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate, pat = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        if any(fnmatch(p, pat) for p in prefixes):
            result = not negate
    return result


def interpolate(value: str) -> str:
    """Compose variable interpolation with an empty environment: defaults, and ``$$`` escapes."""
    value = re.sub(r"\$\{(\w+):?-([^}]*)\}", lambda m: os.environ.get(m.group(1), m.group(2)), value)
    return value.replace("$$", "$")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a host path, resolved, or a named volume) of short-syntax volumes."""
    mounts = {}
    for spec in service.get("volumes", []):
        source, target, *_ = interpolate(spec).split(":")
        mounts[target] = str((ROOT / source).resolve()) if source.startswith((".", "/")) else source
    return mounts


def container_ports(service: dict[str, Any]) -> dict[int, int]:
    """Container port -> host port of a service's ``HOST:CONTAINER`` port mappings."""
    out = {}
    for spec in service.get("ports", []):
        host, container = interpolate(str(spec)).rsplit(":", 1)
        out[int(container)] = int(host)
    return out


# ---- the Dockerfile ------------------------------------------------------------------------------
def test_dockerfile_copies_what_the_build_needs():
    ignore = [line.strip() for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    sources = [s for flags, srcs, _ in copies() if not any(f.startswith("--from") for f in flags) for s in srcs]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such path in the build context"
        assert not ignored(src.rstrip("/"), ignore), f"COPY {src}: excluded by Dockerfile.dockerignore"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = project["tool"]["setuptools"]["package-dir"]
    needed = {package_dirs.get(p.split(".")[0], p.split(".")[0]).split("/")[0]
              for p in project["tool"]["setuptools"]["packages"]}
    needed |= {"pyproject.toml", project["project"]["readme"]}
    copied = {s.rstrip("/") for s in sources}
    assert needed <= copied, f"setuptools needs {sorted(needed - copied)} to build the wheel"
    for path in (ROOT / "server").rglob("*.py"):  # every module reaches the image, nothing stale does
        assert not ignored(str(path.relative_to(ROOT)), ignore), path
    assert ignored(".venv/bin/python", ignore) and ignored("tests/conftest.py", ignore)
    assert ignored("server/__pycache__/app.cpython-311.pyc", ignore)


def test_dockerfile_runtime_is_lean_non_root_and_healthchecked():
    stage = final_stage()
    words = dict(stage)
    assert stage[0][1] == "python:3.11-slim", "the stdlib corpus needs the image's stdlib .py sources"
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    assert '[server]"' in runs and "torch" not in runs.lower()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"] + project["optional-dependencies"]["server"]:
        assert not requirement.lower().startswith("torch"), requirement
    user = words["USER"]
    assert user not in ("root", "0") and re.search(rf"useradd\b.*\b{user}\b", runs), user
    env = image_env()
    assert json.loads(words["VOLUME"]) == ["/cache"] and env["HF_HOME"].startswith("/cache")
    assert Path(env["TOKENFEED_CONFIG"]).parent == Path("/config")
    assert {int(p) for p in words["EXPOSE"].split()} == {int(env["TOKENFEED_PORT"]), int(env["TOKENFEED_METRICS_PORT"])}
    health = words["HEALTHCHECK"]
    assert re.search(r'CMD data-server health --address "127\.0\.0\.1:\$\{TOKENFEED_PORT\}"', health), health
    entrypoint = json.loads(words["ENTRYPOINT"])
    (_, srcs, dest), = [c for c in copies() if c[1] == ["docker/entrypoint.sh"]]
    assert entrypoint == [dest] and os.access(ROOT / srcs[0], os.X_OK)
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["data-server"]
    help_text = subprocess.run([sys.executable, "-m", "server", "health", "--help"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
    assert "--address" in help_text and "--timeout" in help_text


# ---- compose.yaml --------------------------------------------------------------------------------
def test_compose_follows_the_spec_and_matches_the_image():
    spec = compose()
    assert set(spec) <= {"name", "services", "networks", "volumes", "configs", "secrets", "include"}
    services = spec["services"]
    assert {"data-server", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for target, source in volume_mounts(svc).items():
            assert target.startswith("/"), f"{name}: volume target {target} is not absolute"
            assert source.startswith("/") or source in spec.get("volumes", {}), f"{name}: undeclared volume {source}"
            assert not source.startswith("/") or Path(source).exists(), f"{name}: bind source {source} missing"
    hosts = [h for svc in services.values() for h in container_ports(svc).values()]
    assert len(hosts) == len(set(hosts)), "two services publish the same host port"

    server = services["data-server"]
    assert "depends_on" not in server, "`docker compose up data-server` must start the server alone"
    context = ROOT / server["build"]["context"]
    assert context.resolve() == ROOT and (context / server["build"]["dockerfile"]).resolve() == DOCKERFILE
    env = {**image_env(), **server.get("environment", {})}
    ports = container_ports(server)
    assert set(ports) == {int(env["TOKENFEED_PORT"]), int(env["TOKENFEED_METRICS_PORT"])}
    mounts = volume_mounts(server)
    assert mounts["/config"] == str(DOCKER / "config") and not (DOCKER / "config" / "server.yaml").exists(), \
        "the default stack serves the embedded corpus: ship no server.yaml"
    assert mounts["/cache"] in spec["volumes"] and "/data" in mounts
    test = server["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "data-server health" in test[1]
    assert interpolate(test[1]).count("${TOKENFEED_PORT}") == 1
    assert int(server["stop_grace_period"].rstrip("s")) > 5  # > server.shutdown_grace_s


def test_prometheus_and_grafana_files_fit_the_stack():
    services = compose()["services"]
    prom = services["prometheus"]
    mounts = volume_mounts(prom)
    config_file = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    assert mounts[config_file] == str(DOCKER / "prometheus.yml")
    scrape = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
              for job in yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"]}
    metrics_port = int(services["data-server"]["environment"]["TOKENFEED_METRICS_PORT"])
    assert scrape["tokenfeed-server"] == [f"data-server:{metrics_port}"]
    assert [int(t.rsplit(":", 1)[1]) for t in scrape["tokenfeed-trainer"]] == list(range(9500, 9508))
    assert "host.docker.internal:host-gateway" in prom["extra_hosts"]
    promtool = shutil.which("promtool")  # from the prometheus package (scripts/install_prometheus.sh)
    assert promtool, "promtool is missing: run scripts/install_prometheus.sh (scripts/test.sh does)"
    subprocess.run([promtool, "check", "config", str(DOCKER / "prometheus.yml")], check=True, capture_output=True)

    grafana = services["grafana"]
    mounts = volume_mounts(grafana)
    provisioning = Path(mounts["/etc/grafana/provisioning"])
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == f"http://prometheus:{next(iter(container_ports(prom)))}"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "tokenfeed.yml").read_text())["providers"]
    assert Path(mounts[provider["options"]["path"]]) == DASHBOARD.parent
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == source["uid"] and panel["targets"], panel["title"]
        assert all(t["expr"].strip() and t["datasource"]["uid"] == source["uid"] for t in panel["targets"])
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for needed in ("tokenfeed_cache_hits_total", "tokenfeed_batch_assembly_seconds_bucket",
                   "tokenfeed_sent_tokens_total", "tokenfeed_active_streams", "tokenfeed_trainer_data_stall_fraction",
                   "tokenfeed_bad_records_total", "tokenfeed_cache_bytes", "tokenfeed_sent_pad_tokens_total"):
        assert needed in exprs, f"the dashboard shows no {needed}"


# ---- the container's command, outside Docker -----------------------------------------------------
class Entrypoint:
    """docker/entrypoint.sh run as the image runs it: the image's ENV, container paths mapped to
    temporary directories, listening on 127.0.0.1 and port 0 (the one liberty taken)."""

    def __init__(self, tmp_path: Path, config: dict[str, Any] | None = None) -> None:
        paths = {f"/{d}": tmp_path / d for d in ("config", "data", "cache")}
        for p in paths.values():
            p.mkdir(exist_ok=True)
        self.env = {k: re.sub(r"^/(config|data|cache)", lambda m: str(paths[m.group(0)]), v)
                    for k, v in image_env().items()}
        self.env.update(TOKENFEED_HOST="127.0.0.1", TOKENFEED_PORT="0", TOKENFEED_METRICS_PORT="0",
                        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        if config is not None:
            Path(self.env["TOKENFEED_CONFIG"]).write_text(yaml.safe_dump(config))
        cmd = json.loads(dict(final_stage())["CMD"])
        self.proc = subprocess.Popen([str(DOCKER / "entrypoint.sh"), *cmd], cwd=tmp_path, env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        ready = threading.Event()
        threading.Thread(target=self._pump, args=(ready,), daemon=True).start()
        ready.wait(60)
        log = "".join(self.lines)
        m = re.search(r"listening on \S+:(\d+)", log)
        assert m and self.proc.poll() is None, "entrypoint did not start:\n" + log
        self.port = int(m.group(1))
        self.metrics_url = re.search(r"metrics: serving (\S+)", log).group(1)

    def _pump(self, ready: threading.Event) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if "listening on" in line:
                ready.set()
        ready.set()

    def healthcheck(self) -> int:
        """The Dockerfile's HEALTHCHECK command, by the shell, with the port the server got."""
        command = dict(final_stage())["HEALTHCHECK"].split(" CMD ", 1)[1]
        env = {**self.env, "TOKENFEED_PORT": str(self.port)}
        return subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, timeout=30).returncode

    def datasets(self) -> list[str]:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            reply = pb_grpc.TokenFeedStub(channel).Describe(pb.DescribeRequest(), timeout=30)
        return [d.name for d in reply.datasets]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.mark.integration
def test_entrypoint_serves_the_embedded_corpus_and_passes_its_healthcheck(tmp_path):
    box = Entrypoint(tmp_path)
    try:
        assert box.datasets() == ["stdlib"]
        assert "serving the embedded stdlib corpus" in "".join(box.lines)
        assert box.healthcheck() == 0
        with urllib.request.urlopen(box.metrics_url, timeout=10) as resp:
            assert 'tokenfeed_dataset_shards{dataset="stdlib"}' in resp.read().decode()
    finally:
        code = box.stop()
    assert code == 0, "".join(box.lines)
    assert box.healthcheck() == 1  # nothing serves any more


@pytest.mark.integration
def test_entrypoint_serves_a_mounted_config(tmp_path):
    write_jsonl(tmp_path / "data", make_documents(20))
    config = jsonl_config(tmp_path / "data")
    box = Entrypoint(tmp_path, config)
    try:
        assert box.datasets() == ["docs"]
        assert box.healthcheck() == 0
    finally:
        assert box.stop() == 0


@pytest.mark.integration
def test_health_turns_not_serving_on_sigterm_while_a_watch_is_open(start_server, corpus):
    path, _ = corpus
    server = start_server(jsonl_config(path, shutdown_grace_s=10))
    channel = grpc.insecure_channel(server.address)
    stub = health_pb2_grpc.HealthStub(channel)
    seen: dict[str, list[int]] = {"": [], TOKENFEED_SERVICE: []}
    events = {name: (threading.Event(), threading.Event()) for name in seen}
    calls = {name: stub.Watch(health_pb2.HealthCheckRequest(service=name)) for name in seen}

    def watch(name: str) -> None:
        serving, stopped = events[name]
        try:
            for reply in calls[name]:
                seen[name].append(reply.status)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    serving.set()
                elif reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    stopped.set()
        except grpc.RpcError:
            pass  # cancelled below, or the server went away

    threads = [threading.Thread(target=watch, args=(name,), daemon=True) for name in seen]
    for t in threads:
        t.start()
    for serving, _ in events.values():
        assert serving.wait(20)
    server.proc.send_signal(signal.SIGTERM)
    for name, (_, stopped) in events.items():
        assert stopped.wait(20), f"Watch({name!r}) got {seen[name]}, never NOT_SERVING"
    for call in calls.values():
        call.cancel()  # the watches were what kept the 10 s grace period busy
    for t in threads:
        t.join(10)
    channel.close()
    assert server.proc.wait(20) == 0
    assert all(s[0] == health_pb2.HealthCheckResponse.SERVING for s in seen.values())
