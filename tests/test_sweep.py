"""A sweep (``python -m trainer.sweep``): two trainer configurations against one real data server (its
/metrics read) and one real MLflow server; each its own tracker run, the server's cache serving both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import jsonl_config, make_documents, write_jsonl
from tests.test_metrics import metrics_url, scrape, value
from tests.test_tracking import MlflowServer, client
from tests.test_trainer import ENV, ROOT, TINY

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_configurations_two_tracker_runs_and_each_shard_tokenized_once(
        start_server: Any, mlflow_server: MlflowServer, tmp_path: Path) -> None:
    # about 10 KB in 2 KB shards: the first run's 12 steps of 16 rows of 64 tokens read more than an epoch, so
    # it tokenizes every shard and no prefetch of it can land in the second run's figures
    write_jsonl(tmp_path / "data", make_documents(8, seed=5), files=2)
    server = start_server(jsonl_config(tmp_path / "data", shard_bytes=2048), extra_args=["--metrics-port", "0"])
    from client import StreamingDataset

    shards = StreamingDataset(server.address, "docs", seq_len=64, batch_size=4).describe_server().datasets[0].num_shards
    assert shards >= 3
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "root": str(tmp_path / "runs"), "metrics_url": metrics_url(server),
        "overrides": {**{k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in TINY)},
                      "data.address": server.address, "data.dataset": "docs", "data.batch_size": 16, "max_steps": 12,
                      "eval.every": 6,
                      "tracking.backend": "mlflow", "tracking.uri": mlflow_server.uri, "tracking.experiment": "sweep"},
        "grid": {"optim.lr": [0.003, 0.001]}}))
    proc = subprocess.run([sys.executable, "-m", "trainer.sweep", str(sweep)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stdout)  # the summary (pytest -rP shows it)
    records = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert [r["name"] for r in records] == ["lr=0.003", "lr=0.001"]

    # the server: the first run tokenized every shard it read, the second none (all cache hits)
    first, second = (r["server"] for r in records)
    assert 1 <= first["tokenized_shards"] <= shards and second["tokenized_shards"] == 0, records
    assert value(scrape(metrics_url(server)), "tokenfeed_tokenized_shards_total") == shards  # each once, in all
    assert second["cache_hits"] > 0 and second["cache_misses"] == 0, records
    assert "lr=0.001: exit 0" in proc.stdout and "0 shards tokenized" in proc.stdout, proc.stdout

    # the tracker: two runs, each with its own name and learning rate, each with its model
    tracker = client(mlflow_server)
    runs = tracker.search_runs([tracker.get_experiment_by_name("sweep").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"lr=0.003", "lr=0.001"}
    for record in records:
        run = by_name[record["name"]]
        assert run.info.run_id == record["tracker_runs"]["mlflow"] and run.info.status == "FINISHED"
        assert float(run.data.params["optim.lr"]) == record["overrides"]["optim.lr"]
        assert record["artifact"] == f"runs:/{run.info.run_id}/model"
