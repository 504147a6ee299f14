"""``python -m trainer.sweep SWEEP.yaml``: several trainer configurations against one data server.

Each configuration is a trainer launch of its own (its run directory ``ROOT/NAME``, its tracker run named
NAME), one after the other. They all read the same dataset from the same server, so the server's shared
cache tokenizes each shard once for the whole sweep: with ``metrics_url`` set, the summary shows each run's
share of the server's tokenizing and cache work (the second and later runs: no shard tokenized again).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

#: Server counters read around each run (summed over their labels).
SERVER_COUNTERS = {"tokenized_shards": "tokenfeed_tokenized_shards_total", "cache_hits": "tokenfeed_cache_hits_total",
                   "cache_misses": "tokenfeed_cache_misses_total"}
SUMMARY_FILE = "sweep.json"


class SweepConfig(BaseModel):
    """A sweep: shared settings plus one set of overrides per run (``runs``, or the product of ``grid``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: Path = Field(default=Path("runs/sweep"), description="Run directories go to ROOT/NAME.")
    config: Path | None = Field(default=None, description="Trainer YAML config every run starts from.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="`section.field: value` for every run "
                                      "(e.g. data.address, tracking.backend).")
    runs: dict[str, dict[str, Any]] = Field(default_factory=dict, description="NAME -> its own overrides.")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="`section.field: [values]`; one run per "
                                       "combination, named from the values.")
    nproc: int = Field(default=1, ge=1, description="Ranks per run (torchrun when above 1).")
    metrics_url: str | None = Field(default=None, description="The data server's /metrics, read around each run.")

    @model_validator(mode="after")
    def _some_runs(self) -> SweepConfig:
        if not self.runs and not self.grid:
            raise ValueError("name the runs: `runs` (NAME: {overrides}) or `grid` (field: [values])")
        return self

    def plan(self) -> dict[str, dict[str, Any]]:
        """NAME -> the overrides of that run (the shared ones, then its own)."""
        runs = dict(self.runs)
        keys = list(self.grid)
        for values in itertools.product(*(self.grid[k] for k in keys)):
            name = "-".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(keys, values))
            runs[name] = dict(zip(keys, values))
        return {name: {**self.overrides, **own} for name, own in runs.items()}


def command(cfg: SweepConfig, name: str, overrides: dict[str, Any]) -> list[str]:
    """The trainer launch of run ``name`` (values as JSON, which the trainer's YAML parser reads)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(cfg.nproc)] \
        if cfg.nproc > 1 else []
    config = ["--config", str(cfg.config)] if cfg.config else []
    return [sys.executable, *launcher, "-m", "trainer", *config, "--run-dir", str(cfg.root / name),
            *(f"{k}={json.dumps(v)}" for k, v in {"tracking.run_name": name, **overrides}.items())]


def server_counters(url: str | None) -> dict[str, float]:
    """The server's counters in ``SERVER_COUNTERS`` (empty without a URL or when it cannot be read)."""
    if not url:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
    except OSError as err:
        print(f"sweep: cannot read {url} ({err}); no server figures", file=sys.stderr)
        return {}
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return {key: sum(s.value for s in samples if s.name == name) for key, name in SERVER_COUNTERS.items()}


def _outcome(run_dir: Path) -> dict[str, Any]:
    """What a finished run left: its end (COMPLETE) and its tracker run id."""
    out: dict[str, Any] = {}
    if (run_dir / "COMPLETE").is_file():
        done = json.loads((run_dir / "COMPLETE").read_text())
        out.update(best_eval_loss=done.get("best_eval_loss"), best_step=done.get("best_step"),
                   artifact=(done.get("tracking") or {}).get("artifact"))
    if (run_dir / "tracking.json").is_file():
        state = json.loads((run_dir / "tracking.json").read_text())
        out["tracker_runs"] = {backend: entry.get("run_id") for backend, entry in state.items()}
    return out


def run(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Launch every run in turn; one record per run (exit code, outcome, the server counters' increase)."""
    cfg.root.mkdir(parents=True, exist_ok=True)
    records = []
    for name, overrides in cfg.plan().items():
        before, start = server_counters(cfg.metrics_url), time.monotonic()
        print(f"sweep: run {name}: {' '.join(f'{k}={v}' for k, v in overrides.items())}", file=sys.stderr, flush=True)
        code = subprocess.run(command(cfg, name, overrides)).returncode
        after = server_counters(cfg.metrics_url)
        record = {"name": name, "exit_code": code, "seconds": round(time.monotonic() - start, 1),
                  "overrides": overrides, **_outcome(cfg.root / name),
                  "server": {k: after[k] - before.get(k, 0.0) for k in after}}
        records.append(record)
        (cfg.root / SUMMARY_FILE).write_text(json.dumps(records, indent=1))
    return records


def summary(records: list[dict[str, Any]]) -> str:
    """One line per run: its end, and how much tokenizing it cost the server."""
    lines = []
    for r in records:
        server = r["server"]
        figures = (f"; server: {server['tokenized_shards']:.0f} shards tokenized, {server['cache_hits']:.0f} cache "
                   f"hits, {server['cache_misses']:.0f} misses" if server else "")
        loss = f"best eval loss {r['best_eval_loss']:.4f}" if r.get("best_eval_loss") is not None else "no eval"
        lines.append(f"{r['name']}: exit {r['exit_code']}, {loss}, {r['seconds']:.0f} s{figures}")
    return "\n".join(lines)


def load(path: Path) -> SweepConfig:
    """The sweep file, validated.

    Raises:
        ValueError: unreadable, or a field that is wrong (named in the message).
    """
    try:
        return SweepConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read sweep file {path}: {err}") from None
    except ValidationError as err:
        fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(sweep)'}: {e['msg']}" for e in err.errors())
        raise ValueError(f"invalid sweep file {path}: {fields}") from None


def main(argv: list[str] | None = None) -> int:
    """Command line; 0 when every run finished."""
    p = argparse.ArgumentParser(prog="python -m trainer.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="sweep YAML (root, config, overrides, runs or grid, nproc, metrics_url)")
    args = p.parse_args(argv)
    try:
        cfg = load(args.sweep)
    except ValueError as err:
        print(f"sweep: {err}", file=sys.stderr)
        return 2
    records = run(cfg)
    print(summary(records))
    print(f"sweep: summary in {cfg.root / SUMMARY_FILE}", file=sys.stderr)
    return 0 if all(r["exit_code"] == 0 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
