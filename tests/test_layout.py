"""Packaging rules: generated code is reproducible, layers import in one direction."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

from tests.conftest import ROOT

PROTO = ROOT / "proto"

# The generator writes its own version into the code (grpcio-tools patch releases change it while
# the code stays the same); the comparison is about the code, so those stamps are left out.
VERSION_STAMPS = re.compile(
    r"GRPC_GENERATED_VERSION = '[^']*'"
    r"|# Protobuf Python Version: \S+"
    r"|ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*\d+,\s*\d+,\s*\d+,")


def without_version_stamps(code: str) -> str:
    return VERSION_STAMPS.sub("<version>", code)


def test_generated_code_matches_the_proto(tmp_path):
    from grpc_tools import protoc

    args = ["protoc", f"-I{PROTO}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", str(PROTO / "tokenfeed/v1/tokenfeed.proto")]
    assert protoc.main(args) == 0
    for name in ("tokenfeed_pb2.py", "tokenfeed_pb2.pyi", "tokenfeed_pb2_grpc.py"):
        fresh = without_version_stamps((tmp_path / "tokenfeed/v1" / name).read_text())
        committed = without_version_stamps((PROTO / "tokenfeed/v1" / name).read_text())
        assert fresh == committed, f"{name} is stale: regenerate it (see README, 'Protocol')"


def imported_modules(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_layers_import_in_one_direction():
    assert not imported_modules("server") & {"torch", "client", "trainer"}
    assert not imported_modules("client") & {"server", "trainer"}
    assert "server" not in imported_modules("trainer")


def test_server_runs_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import server.app, server.__main__\n"
            "from server.config import default_config\n"
            "server.app.build_datasets(default_config())\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ---- the server's wings -------------------------------------------------------------------------
#: Imports run one way, app -> serve -> stream -> supply -> stages, with config, errors and metrics
#: on the ground: a module may import its own wing and the wings below it, never one above.
WINGS = {"config": 0, "errors": 0, "metrics": 0, "stages": 1, "supply": 2, "stream": 3, "serve": 4}
TOP = 5  # app, exporter, prepare, __main__


def wing_of(module: str) -> int:
    parts = module.split(".")
    return WINGS.get(parts[1], TOP) if parts[0] == "server" and len(parts) > 1 else TOP


def server_imports() -> dict[str, set[str]]:
    """Each server module (dotted) and the modules it imports, deferred imports included."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "server").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        mods = found.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods.add(node.module)
                mods.update(f"{node.module}.{a.name}" for a in node.names)  # `from server import metrics`
    return found


def test_server_wings_import_downwards_only():
    wrong = [f"{mod} -> {imp}" for mod, imports in server_imports().items() for imp in imports
             if imp.startswith("server.") and wing_of(imp) > wing_of(mod)]
    assert not wrong, f"imports that run back up: {wrong}"


def test_inner_wings_know_no_grpc_and_stages_and_streams_no_asyncio():
    """The stages compute, the stream wing decides (its walk and dealing are generators that yield
    what they wait for); only the supply, the gRPC edge (``server.serve.drive`` drives a stream)
    and the app await."""
    for mod, imports in server_imports().items():
        roots = {i.split(".")[0] for i in imports}
        if wing_of(mod) <= WINGS["stream"]:
            assert not roots & {"grpc", "grpc_health", "grpc_reflection"}, f"{mod} imports gRPC"
        if wing_of(mod) in (WINGS["stages"], WINGS["stream"]):
            assert "asyncio" not in roots, f"{mod} imports asyncio"


def test_nothing_in_the_stream_wing_awaits():
    asynchronous = (ast.AsyncFunctionDef, ast.Await, ast.AsyncFor, ast.AsyncWith)
    for path in (ROOT / "server" / "stream").rglob("*.py"):
        found = [f"line {n.lineno}: {type(n).__name__}" for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, asynchronous)]
        assert not found, f"{path.relative_to(ROOT)} awaits: {found}"


def test_metrics_imports_nothing_of_ours():
    imports = server_imports()["server.metrics"]
    assert not {i for i in imports if i.split(".")[0] in ("server", "tokenfeed", "client", "trainer")}


def test_server_modules_import_no_circles():
    imports = server_imports()  # (parsed once: every module's imports)
    graph = {mod: {i for i in found if i in imports} for mod, found in imports.items()}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(mod: str, path: list[str]) -> None:
        seen[mod] = 1
        for nxt in sorted(graph[mod]):
            assert seen.get(nxt) != 1, f"import circle: {' -> '.join(path + [mod, nxt])}"
            if nxt not in seen:
                visit(nxt, path + [mod])
        seen[mod] = 2

    for mod in sorted(graph):
        if mod not in seen:
            visit(mod, [])


def test_only_the_grpc_edge_touches_protobuf_and_the_ring():
    wire_modules = ("tokenfeed.v1", "tokenfeed.wire", "tokenfeed.shm", "google.protobuf", "grpc")
    for mod, imports in server_imports().items():
        if wing_of(mod) >= WINGS["serve"]:  # the edge, and the process around it (app, CLI, exporter)
            continue
        touched = {i for i in imports if i.startswith(wire_modules) or i in ("tokenfeed.wire", "tokenfeed.shm")}
        assert not touched, f"{mod} imports {sorted(touched)}: protobuf and the ring belong to server/serve"


def imports_of(folder: str) -> dict[str, set[str]]:
    """Each file under ``folder`` and the dotted modules it imports (deferred imports included)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / folder).rglob("*.py"):
        mods = found.setdefault(str(path.relative_to(ROOT)), set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods.add(node.module)
    return found


#: What a benchmark may import of ours: the client, the wire package, the server's entry points
#: (``server.app``: build and start a server in-process; ``server.config``) and its stages (the
#: sync library that turns a corpus into rows: readers, tokenizers, packing, the global order).
#: The supply, the streams and the gRPC edge are the server's inside; a benchmark measures them
#: through a running server.
BENCHMARK_API = ("client", "tokenfeed", "server.app", "server.config", "server.stages", "benchmarks")


def test_benchmarks_use_public_apis_only():
    ours = ("server", "client", "trainer", "tokenfeed", "tests", "benchmarks")
    wrong = [f"{path}: {mod}" for path, mods in imports_of("benchmarks").items() for mod in sorted(mods)
             if mod.split(".")[0] in ours and not any(mod == api or mod.startswith(api + ".") for api in BENCHMARK_API)]
    assert not wrong, f"benchmarks import internals: {wrong}"


def test_trainer_uses_the_client_not_the_wire():
    wrong = [f"{path}: {mod}" for path, mods in imports_of("trainer").items() for mod in sorted(mods)
             if mod.startswith(("tokenfeed.v1", "google.protobuf", "client."))]
    assert not wrong, f"the trainer reaches past the client's public API: {wrong}"
