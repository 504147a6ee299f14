"""Trainer pieces that need no server: config validation, the schedule, Prometheus metrics."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest

from trainer.__main__ import load, main
from trainer.config import EVAL_SEED_OFFSET, ConfigError, build_config, parse_overrides


@pytest.mark.parametrize("overrides, field", [
    ({"model": {"width": -4}}, "model.width"),
    ({"model": {"widht": 64}}, "model.widht"),
    ({"model": {"width": 66, "heads": 4}}, "model.heads"),
    ({"data": {"seq_len": 512}}, "data.seq_len"),
    ({"optim": {"betas": [0.9, 1.5]}}, "optim.betas"),
    ({"eval": {"patience": -1}}, "eval.patience"),
    ({"data": {"address": []}}, "data.address"),
    ({"max_steps": "many"}, "max_steps"),
    ({"data": {"packing": "zip"}}, "data.packing"),
    ({"metrics_port": 70000}, "metrics_port"),
])
def test_config_errors_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"invalid trainer config: .*{field}"):
        build_config(None, overrides)


def test_yaml_overrides_and_flags_compose(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("max_steps: 7\nmodel: {width: 96, heads: 4}\ndata: {dataset: docs}\n")
    cfg, resume = load(["--config", str(path), "model.width=32", "--address", "a:1,b:2", "--max-steps", "9",
                        "--resume", "eval.dataset=held", "--checkpoint-every", "3", "--run-dir", "r", "--seed", "5"])
    assert (cfg.max_steps, cfg.model.width, cfg.model.heads, cfg.data.dataset) == (9, 32, 4, "docs")
    assert cfg.data.address == ["a:1", "b:2"] and cfg.checkpoint.every == 3 and resume
    assert (str(cfg.run_dir), cfg.seed, cfg.eval_dataset, cfg.eval_seed) == ("r", 5, "held", 5)
    assert build_config(None, {"seed": 5}).eval_seed == 5 + EVAL_SEED_OFFSET  # same dataset: another order


def test_bad_overrides_and_files_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_overrides(["model.width"])
    with pytest.raises(ConfigError, match="override model.width.x: width is not a section"):
        parse_overrides(["model.width=3", "model.width.x=4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        build_config(bad)
    assert main(["--config", str(bad)]) == 2
    assert main(["model.layers=0"]) == 2
    assert "model.layers: Input should be greater than or equal to 1 (got 0)" in capsys.readouterr().err


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    from trainer.loop import lr_factor

    f = [lr_factor(e, warmup=4, max_steps=20, min_ratio=0.1) for e in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False)) and f[-1] > 0.1
    assert lr_factor(20, warmup=4, max_steps=20, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(0, warmup=0, max_steps=10, min_ratio=0.0) == 1.0


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two adjacent free ports")


def test_prometheus_metrics_are_per_rank_on_port_plus_rank() -> None:
    from trainer.metrics import TrainerMetrics

    base = _free_port_pair()
    metrics = TrainerMetrics(rank=1, port=base, addr="127.0.0.1")
    try:
        assert metrics.port == base + 1
        metrics.data_wait.observe(0.02)
        metrics.step(step_s=0.5, wait_s=0.1, tokens=1000, loss=3.5)
        text = urllib.request.urlopen(f"http://127.0.0.1:{base + 1}/metrics", timeout=10).read().decode()
    finally:
        metrics.close()
    assert 'tokenfeed_trainer_data_wait_seconds_count{rank="1"} 1.0' in text
    assert 'tokenfeed_trainer_data_stall_fraction{rank="1"} 0.2' in text
    assert 'tokenfeed_trainer_tokens_per_second{rank="1"} 2000.0' in text
    assert 'tokenfeed_trainer_step_seconds_sum{rank="1"} 0.5' in text
    assert 'tokenfeed_trainer_loss{rank="1"} 3.5' in text
    assert TrainerMetrics(rank=0, port=None).port is None  # off: nothing listens


def test_the_example_config_is_valid() -> None:
    cfg = build_config(Path(__file__).resolve().parents[1] / "examples" / "train.yaml")
    assert cfg.data.seq_len <= cfg.model.context and cfg.eval.dataset is None


def test_tracker_secrets_are_never_written_out() -> None:
    """tracking.password/token are kept for the tracker client and shown as ********** in every dump (config.yaml,
    checkpoints, tracker params); credentials in tracking.uri are refused without repeating them."""
    from trainer.config import to_yaml

    cfg = build_config(None, {"tracking": {"backend": "mlflow", "uri": "http://mlflow:5000", "username": "ann",
                                           "password": "s3cret-pw", "token": "s3cret-tok"}})
    assert cfg.tracking.password is not None and cfg.tracking.password.get_secret_value() == "s3cret-pw"
    for dumped in (to_yaml(cfg), str(cfg.model_dump(mode="json")), repr(cfg)):
        assert "s3cret" not in dumped and "ann" in dumped
    with pytest.raises(ConfigError, match="tracking.uri: .*must not hold credentials") as err:
        build_config(None, {"tracking": {"backend": "mlflow", "uri": "http://ann:s3cret-pw@mlflow:5000"}})
    assert "s3cret" not in str(err.value)
