"""The comparison suite's report: the issue-23 goal-1 rows come from one run's figures, and the plot
is drawn even where the project's environment has no matplotlib (a fresh clone's ``.venv``)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from benchmarks.compare import report
from benchmarks.compare.targets import evaluate
from tests.conftest import ROOT

QUICK = ROOT / "benchmarks" / "results" / "compare-quick.json"


def test_goal1_rows_are_ratios_of_the_defaults_row_in_the_same_run():
    res = json.loads(QUICK.read_text())
    g = evaluate(res)["goal1"]
    d, t, p = g["defaults"], g["best_tuned"], g["best_peer"]
    assert d["variant"] == "defaults" and t.get("variant") != "defaults" and p["loader"] == "litdata"
    assert g["vs_tuned"] == pytest.approx(d["tokens_per_s"] / t["tokens_per_s"])
    assert g["vs_peer"] == pytest.approx(d["tokens_per_s"] / p["tokens_per_s"])
    assert g["cpu_ratio"] == pytest.approx(d["cpu_s_per_m_tokens"] / p["cpu_s_per_m_tokens"])
    md = report.markdown(res, evaluate(res))
    assert md.count("23.1 defaults") == 6  # in the targets table and under question 1


def test_the_plot_is_drawn_elsewhere_when_matplotlib_is_missing_here(tmp_path, monkeypatch):
    shutil.copy(QUICK, tmp_path / "run.json")
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as in a fresh clone's .venv: import fails
    res = json.loads(QUICK.read_text())
    md, png = report.write("run", res)
    assert md.exists() and png is None  # no crash: the report without its plot
    md, png = report.write("run", res, plot_python=sys.executable)  # an environment that has it
    assert png is not None and png.stat().st_size > 10_000
