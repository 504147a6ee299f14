"""The cluster deployments (issue 20): the Kubernetes manifests under deploy/kubernetes, rendered with
``kubectl kustomize`` (kubectl from apt when missing), checked against the Kubernetes schemas with
``kubernetes-validate`` (offline) and for the properties the server relies on; and deploy/slurm/train.sbatch
(``bash -n``, and its address list from sample node lists)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from conftest import ROOT
from server.config import Config, parse_config

# The time limit leaves room for installing kubectl from apt on a fresh machine; with it, the module takes ~5 s.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

KUBE = ROOT / "deploy" / "kubernetes"
VARIANTS = {"base": KUBE, "stateful-cache": KUBE / "overlays" / "stateful-cache", "tls": KUBE / "overlays" / "tls"}
#: The oldest Kubernetes the manifests claim (built-in gRPC probes are GA from 1.27) and the newest schemas at hand.
K8S_VERSIONS = ("1.27", kubernetes_validate.latest_version())
SLURM = ROOT / "deploy" / "slurm" / "train.sbatch"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
#: The server's drain must be covered with room to spare for what follows it (gRPC stop, prefetch cancel, exit).
SHUTDOWN_MARGIN_S = 5
#: What the pod needs beyond the server's budgets (interpreter, tokenizer, pyarrow, gRPC buffers).
BASELINE_MEMORY = 512 << 20
Obj = dict[str, Any]


# ---- kubectl and rendering -----------------------------------------------------------------------
def install_kubectl() -> str:
    """kubectl on PATH, else from apt (Debian names it kubernetes-client); a failure says why."""
    found = shutil.which("kubectl")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.fail("kubectl is not installed and installing it from apt needs root: apt-get install -y kubectl")
    script = ("apt-get update -qq && (apt-get install -y -qq kubectl || apt-get install -y -qq kubernetes-client)")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = shutil.which("kubectl")
    if result.returncode != 0 or not found:
        pytest.fail(f"cannot install kubectl from apt (rc {result.returncode}):\n{result.stdout[-2000:]}"
                    f"{result.stderr[-2000:]}")
    return found


def kustomize(kubectl: str, path: Path) -> list[Obj]:
    result = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {path}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def kubectl() -> str:
    return install_kubectl()


@pytest.fixture(scope="module")
def rendered(kubectl: str) -> Iterator[dict[str, list[Obj]]]:
    """Every variant's objects, as ``kubectl kustomize`` renders them."""
    yield {name: kustomize(kubectl, path) for name, path in VARIANTS.items()}


def one(objects: list[Obj], kind: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def workload(objects: list[Obj]) -> Obj:
    found = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    assert len(found) == 1, [o["kind"] for o in found]
    return found[0]


def container(objects: list[Obj]) -> Obj:
    containers = workload(objects)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def server_config(objects: list[Obj]) -> Config:
    """The server.yaml of the rendered ConfigMap, validated by the server's own config model."""
    return parse_config(yaml.safe_load(one(objects, "ConfigMap")["data"]["server.yaml"]), origin="ConfigMap")


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (``6Gi``, ``500m``, ``2``) as a number."""
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and (match.group(2) in suffixes or not match.group(2)), f"not a quantity: {value!r}"
    return float(match.group(1)) * suffixes.get(match.group(2), 1)


def mounted_files(objects: list[Obj], volume_kind: str) -> dict[str, tuple[str, str]]:
    """File path in the container -> (source name, key) of every item of the pod's ``volume_kind`` volumes."""
    pod = workload(objects)["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in container(objects)["volumeMounts"]}
    out = {}
    for volume in pod["volumes"]:
        source = volume.get(volume_kind)
        if source is None or volume["name"] not in mounts:
            continue
        name = source.get("secretName") or source.get("name")
        for item in source.get("items", []):
            out[f"{mounts[volume['name']]}/{item['path']}"] = (name, item["key"])
        if not source.get("items"):  # every key, as a file of its name
            out[f"{mounts[volume['name']]}/*"] = (name, "*")
    return out


def from_volume(files: dict[str, tuple[str, str]], path: str) -> tuple[str, str] | None:
    """(source, key) a file path comes from, whether mounted by item or as a whole volume."""
    if path in files:
        return files[path]
    whole = files.get(f"{path.rsplit('/', 1)[0]}/*")
    return (whole[0], path.rsplit("/", 1)[1]) if whole else None


def args_value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


# ---- schemas -------------------------------------------------------------------------------------
def test_every_variant_renders_the_expected_objects(rendered: dict[str, list[Obj]]) -> None:
    shared = {"ConfigMap", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor"}
    assert sorted(o["kind"] for o in rendered["base"]) == sorted(shared | {"Deployment"})
    assert sorted(o["kind"] for o in rendered["tls"]) == sorted(shared | {"Deployment"})
    assert sorted(o["kind"] for o in rendered["stateful-cache"]) == sorted(shared | {"StatefulSet"})
    for objects in rendered.values():  # token and TLS material comes from Secrets made on the cluster, never here
        assert not [o for o in objects if o["kind"] == "Secret"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_objects_match_the_kubernetes_schemas(rendered: dict[str, list[Obj]], variant: str) -> None:
    errors = []
    for obj in rendered[variant]:
        if obj["kind"] == "ServiceMonitor":  # a CRD: no schema in kubernetes-validate (checked below)
            continue
        for version in K8S_VERSIONS:
            try:  # strict: an unknown field (a typo) is an error, not silently dropped by the API server
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                errors.append(f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}): {err.message} "
                              f"at {'/'.join(map(str, err.path))}")
    assert not errors, "\n".join(errors)


def test_the_schema_check_rejects_broken_objects(rendered: dict[str, list[Obj]]) -> None:
    """The check above can fail: a misspelt field and a wrong type are both caught."""
    typo = copy.deepcopy(workload(rendered["base"]))
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSIONS[-1], strict=True)
    wrong = copy.deepcopy(one(rendered["base"], "Service"))
    wrong["spec"]["ports"][0]["port"] = "fifty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, K8S_VERSIONS[-1])


def test_image_is_composes_and_a_users_overlay_can_replace_it(kubectl: str, tmp_path: Path) -> None:
    """The pods run the image compose.yaml builds; an overlay of the user's own points them at a registry."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    # compose names it `${TOKENFEED_IMAGE:-tokenfeed/data-server:latest}`: the default is what it builds
    built = re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", compose["services"]["data-server"]["image"])
    for variant in VARIANTS.values():
        assert container(kustomize(kubectl, variant))["image"] == built
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "kustomization.yaml").write_text(
        "bases: [../deploy/kubernetes/overlays/stateful-cache]\n"
        "images: [{name: tokenfeed/data-server, newName: registry.example/tf/data-server, newTag: '1.2'}]\n")
    assert container(kustomize(kubectl, tmp_path / "mine"))["image"] == "registry.example/tf/data-server:1.2"


def test_service_monitor_scrapes_every_replica_with_the_metrics_token(rendered: dict[str, list[Obj]]) -> None:
    for objects in rendered.values():
        monitor, service = one(objects, "ServiceMonitor"), one(objects, "Service")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["name"]
        labels = monitor["spec"]["selector"]["matchLabels"]
        assert labels and labels.items() <= service["metadata"]["labels"].items(), "selects no Service"
        [endpoint] = monitor["spec"]["endpoints"]
        by_name = {p["name"]: p for p in service["spec"]["ports"]}
        assert endpoint["port"] in by_name and endpoint.get("path", "/metrics") == "/metrics"
        assert by_name[endpoint["port"]]["port"] == server_config(objects).server.metrics_port
        assert re.fullmatch(r"\d+(ms|s|m)", endpoint["interval"])
        # The bearer token is the same Secret key the server reads as server.metrics_token_file.
        auth = endpoint["authorization"]
        assert auth["type"] == "Bearer"
        secret = (auth["credentials"]["name"], auth["credentials"]["key"])
        token_file = server_config(objects).server.metrics_token_file
        assert token_file is not None and from_volume(mounted_files(objects, "secret"), token_file) == secret


# ---- serving: Service, probes, shutdown ----------------------------------------------------------
def test_service_is_headless_and_selects_the_pods(rendered: dict[str, list[Obj]]) -> None:
    for objects in rendered.values():
        service, pods = one(objects, "Service"), workload(objects)["spec"]["template"]
        assert service["spec"]["clusterIP"] == "None", "a cluster IP would pin long gRPC streams to one pod"
        assert not service["spec"].get("publishNotReadyAddresses", False), "draining pods must leave DNS"
        assert service["spec"]["selector"].items() <= pods["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
        config = server_config(objects).server
        assert ports == {"grpc": config.port, "metrics": config.metrics_port}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]]


def test_environment_matches_the_config(rendered: dict[str, list[Obj]]) -> None:
    """docker/entrypoint.sh passes TOKENFEED_PORT/_METRICS_PORT as flags, which win over the config."""
    for objects in rendered.values():
        env = {e["name"]: e["value"] for e in container(objects)["env"]}
        config = server_config(objects).server
        assert env["TOKENFEED_PORT"] == str(config.port) and env["TOKENFEED_METRICS_PORT"] == str(config.metrics_port)
        assert env["TOKENFEED_HOST"] == "0.0.0.0"
        assert from_volume(mounted_files(objects, "configMap"), env["TOKENFEED_CONFIG"]) == (
            one(objects, "ConfigMap")["metadata"]["name"], "server.yaml")


@pytest.mark.parametrize("variant", ["base", "stateful-cache"])
def test_probes_ask_the_grpc_health_service(rendered: dict[str, list[Obj]], variant: str) -> None:
    c, port = container(rendered[variant]), server_config(rendered[variant]).server.port
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["grpc"] == {"port": port}, probe  # service "": the whole server, NOT_SERVING on SIGTERM


def test_tls_overlay_serves_tls_from_a_secret_and_probes_with_its_ca(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["tls"]
    c, port, secrets = container(objects), server_config(objects).server.port, mounted_files(objects, "secret")
    cert, key = args_value(c["args"], "--tls-cert"), args_value(c["args"], "--tls-key")
    assert cert and key
    assert from_volume(secrets, cert) == ("tokenfeed-tls", "tls.crt")
    assert from_volume(secrets, key) == ("tokenfeed-tls", "tls.key")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert "grpc" not in c[probe], f"{probe}: the kubelet's gRPC probe cannot speak TLS"
        command = c[probe]["exec"]["command"]
        assert command[:2] == ["data-server", "health"], probe
        assert args_value(command, "--address") == f"localhost:{port}"
        ca = args_value(command, "--tls-ca")
        assert ca and from_volume(secrets, ca) == ("tokenfeed-tls", "ca.crt")


def test_termination_grace_outlasts_prestop_and_the_drain(rendered: dict[str, list[Obj]]) -> None:
    for objects in rendered.values():
        pod, c = workload(objects)["spec"]["template"]["spec"], container(objects)
        command = c["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2
        drain = server_config(objects).server.shutdown_grace_s
        assert pod["terminationGracePeriodSeconds"] >= float(command[1]) + drain + SHUTDOWN_MARGIN_S


def test_disruption_budget_covers_the_pods(rendered: dict[str, list[Obj]]) -> None:
    for objects in rendered.values():
        pdb, work = one(objects, "PodDisruptionBudget"), workload(objects)
        assert pdb["spec"]["selector"]["matchLabels"] == work["spec"]["selector"]["matchLabels"]
        assert pdb["spec"].get("maxUnavailable") == 1 or "minAvailable" in pdb["spec"]
        hpa = one(objects, "HorizontalPodAutoscaler")
        assert hpa["spec"]["minReplicas"] >= 2 and work["spec"]["replicas"] >= 2, "one replica cannot be disrupted"


# ---- resources and security ----------------------------------------------------------------------
def test_memory_follows_the_servers_budgets(rendered: dict[str, list[Obj]]) -> None:
    """request = limit = cache.max_bytes + cache.hot_max_bytes + 3 x server.stream_memory_bytes + 512 MiB."""
    for name, objects in rendered.items():
        config, resources = server_config(objects), container(objects)["resources"]
        need = (config.cache.max_bytes + config.cache.hot_max_bytes + 3 * config.server.stream_memory_bytes
                + BASELINE_MEMORY)
        limit = quantity(resources["limits"]["memory"])
        assert quantity(resources["requests"]["memory"]) == limit, f"{name}: memory request != limit"
        assert need <= limit <= need * 1.1, f"{name}: memory {limit / 2**30:.2f} GiB, settings need {need / 2**30:.2f}"
        assert quantity(resources["requests"]["cpu"]) >= config.server.workers
        assert quantity(resources["limits"]["cpu"]) >= quantity(resources["requests"]["cpu"])


def image_paths() -> tuple[int, list[str]]:
    """The image user's uid and the paths its ENV points the server's caches at (HOME, XDG, HF)."""
    text = DOCKERFILE.read_text()
    uid = re.search(r"--uid (\d+)", text)
    assert uid, "docker/Dockerfile: no --uid for the image's user"
    paths = re.findall(r"\b(?:HOME|XDG_CACHE_HOME|HF_HOME)=(\S+)", text)
    assert paths
    return int(uid.group(1)), paths


def test_pods_run_unprivileged_on_a_read_only_root(rendered: dict[str, list[Obj]]) -> None:
    uid, cache_paths = image_paths()
    for name, objects in rendered.items():
        work, c = workload(objects), container(objects)
        pod = work["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid != 0
        assert pod.get("automountServiceAccountToken") is False
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
        # What the server writes lies on a writable volume: an emptyDir, or the StatefulSet's claim.
        writable = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        writable |= {t["metadata"]["name"] for t in work["spec"].get("volumeClaimTemplates", [])}
        dirs = [m["mountPath"] for m in c["volumeMounts"] if m["name"] in writable and not m.get("readOnly")]
        config = server_config(objects)
        needed = cache_paths + ["/tmp"] + ([config.cache.disk.path] if config.cache.disk else [])
        for path in needed:
            assert any(Path(path).is_relative_to(d) for d in dirs), f"{name}: {path} is not on a writable volume"


def test_token_files_come_from_secrets(rendered: dict[str, list[Obj]]) -> None:
    for objects in rendered.values():
        config, secrets = server_config(objects).server, mounted_files(objects, "secret")
        assert config.auth_tokens_file and config.metrics_token_file, "streams and /metrics need tokens"
        assert from_volume(secrets, config.auth_tokens_file) == ("tokenfeed-auth", "tokens")
        assert from_volume(secrets, config.metrics_token_file) == ("tokenfeed-auth", "metrics-token")
        assert not config.shared_memory, "trainers run on other nodes"


# ---- the disk-cache overlay and the autoscaler ---------------------------------------------------
def without_cache_volume(template: Obj) -> Obj:
    """A pod template minus its /cache volume (an emptyDir in the base, a claim in the StatefulSet) and the
    hash in its ConfigMap's name (the configs differ in cache.disk)."""
    template = copy.deepcopy(template)
    template["spec"]["volumes"] = [v for v in template["spec"]["volumes"] if v["name"] != "cache"]
    for volume in template["spec"]["volumes"]:
        if "configMap" in volume:
            volume["configMap"]["name"] = volume["configMap"]["name"].rsplit("-", 1)[0]
    return template


def test_stateful_cache_keeps_a_volume_per_replica(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["stateful-cache"]
    sts, config = workload(objects), server_config(objects)
    assert sts["kind"] == "StatefulSet" and sts["spec"]["serviceName"] == one(objects, "Service")["metadata"]["name"]
    assert config.cache.disk is not None, "the overlay exists for the disk tier"
    [claim] = sts["spec"]["volumeClaimTemplates"]
    mount = next(m for m in container(objects)["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert Path(config.cache.disk.path).is_relative_to(mount["mountPath"])
    assert quantity(claim["spec"]["resources"]["requests"]["storage"]) >= config.cache.disk.max_bytes
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Apart from the cache volume and the config's generated name, the pods are the base's.
    base = workload(rendered["base"])["spec"]["template"]
    assert without_cache_volume(sts["spec"]["template"]) == without_cache_volume(base)
    base_config = server_config(rendered["base"])
    assert config.model_copy(update={"cache": base_config.cache}) == base_config, "only cache.disk differs"
    assert config.cache.model_copy(update={"disk": None}) == base_config.cache


def test_autoscaler_follows_the_trainers_data_wait(rendered: dict[str, list[Obj]]) -> None:
    trainer_metrics = (ROOT / "trainer" / "metrics.py").read_text()
    for objects in rendered.values():
        hpa, work = one(objects, "HorizontalPodAutoscaler"), workload(objects)
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"], ref["apiVersion"]) == (work["kind"], work["metadata"]["name"], "apps/v1")
        [metric] = hpa["spec"]["metrics"]
        assert metric["type"] == "External"
        name = metric["external"]["metric"]["name"]
        assert re.search(rf'Gauge\("{name}"', trainer_metrics), f"{name} is not a trainer metric (trainer/metrics.py)"
        assert 0 < quantity(metric["external"]["target"]["value"]) < 1, "a fraction of each step spent waiting"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300, "scale-down moves streams"


# ---- Slurm ---------------------------------------------------------------------------------------
def run_bash(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``script`` after sourcing train.sbatch, with a PATH of no tools: the built-in node list expansion runs,
    not scontrol."""
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    bash = shutil.which("bash")
    assert bash
    return subprocess.run([bash, "-c", f"source {SLURM}\n{script}"], capture_output=True, text=True, timeout=30,
                          env={"PATH": str(empty)}, cwd=tmp_path)


def test_slurm_script_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(SLURM)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    directives = [line for line in SLURM.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH hetjob" in directives, "servers and trainers are two components of one job"


@pytest.mark.parametrize(("nodelist", "expected"), [
    ("cpu[01-03,07],login1", ["cpu01", "cpu02", "cpu03", "cpu07", "login1"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("rack[1-2]-n[09-10]", ["rack1-n09", "rack1-n10", "rack2-n09", "rack2-n10"]),
    ("solo", ["solo"]),
])
def test_slurm_address_list_from_the_node_list(nodelist: str, expected: list[str], tmp_path: Path) -> None:
    result = run_bash(f'expand_hostlist "{nodelist}"', tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == expected
    result = run_bash(f'server_addresses "{nodelist}" 50051 -ib', tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ",".join(f"{host}-ib:50051" for host in expected)


def test_slurm_script_refuses_to_run_outside_a_job(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(SLURM)], capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
    assert result.returncode != 0 and "heterogeneous job" in result.stderr
    assert not (tmp_path / "runs").exists(), "nothing is created before the job's node lists are known"
