"""Packaging rules: generated code is reproducible, layers import in one direction."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT

PROTO = ROOT / "proto"


def test_generated_code_matches_the_proto(tmp_path):
    from grpc_tools import protoc

    args = ["protoc", f"-I{PROTO}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", str(PROTO / "tokenfeed/v1/tokenfeed.proto")]
    assert protoc.main(args) == 0
    for name in ("tokenfeed_pb2.py", "tokenfeed_pb2.pyi", "tokenfeed_pb2_grpc.py"):
        fresh = (tmp_path / "tokenfeed/v1" / name).read_text()
        committed = (PROTO / "tokenfeed/v1" / name).read_text()
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
