"""Exported models named by a tracker URI (``mlflow:runs:/RUN_ID/model``), fetched once into a local cache."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from trainer.export import CONFIG_FILE, MODEL_FILE

MLFLOW_PREFIX = "mlflow:"


def default_cache() -> Path:
    """``$TOKENFEED_MODEL_CACHE``, else ``~/.cache/tokenfeed/models``."""
    env = os.environ.get("TOKENFEED_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tokenfeed" / "models"


def cache_path(spec: str, cache: Path) -> Path:
    """Where ``spec`` is cached: keyed by the URI alone (an MLflow run id is unique), so a cached model
    is found without asking the tracker anything."""
    return cache / hashlib.sha256(spec.encode()).hexdigest()[:24]


def resolve(spec: str, cache: Path | None = None, tracking_uri: str | None = None) -> Path:
    """A local directory (or file) holding the exported model named by ``spec``.

    Args:
        spec: a local path, or ``mlflow:runs:/RUN_ID/model`` (any MLflow artifact URI of an export).
        cache: where fetched models are kept (default ``default_cache()``).
        tracking_uri: the MLflow tracking server (default: ``MLFLOW_TRACKING_URI``); only asked on a miss.

    Raises:
        ValueError: an unknown scheme, or a fetch that failed (the message names the URI).
    """
    if not spec.startswith(MLFLOW_PREFIX):
        if spec.startswith("wandb:"):
            raise ValueError(f"--model {spec}: W&B artifacts are not supported yet; download it with "
                             "`wandb artifact get` and pass the directory")
        return Path(spec)
    uri = spec[len(MLFLOW_PREFIX):]
    target = cache_path(spec, cache or default_cache())
    if (target / MODEL_FILE).is_file() and (target / CONFIG_FILE).is_file():
        return target  # fetched before: no tracker call at all
    return _fetch_mlflow(uri, target, tracking_uri)


def _fetch_mlflow(uri: str, target: Path, tracking_uri: str | None) -> Path:
    """Download the export to ``target`` (it appears by rename, so a cache entry is never partial)."""
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise ValueError(f"--model mlflow:{uri} needs the tracking server: --tracking-uri or MLFLOW_TRACKING_URI")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail in seconds, not minutes
    try:
        import mlflow.artifacts
    except ImportError:
        raise ValueError("--model mlflow:... needs the mlflow package: pip install 'tokenfeed[mlflow]'") from None
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp),
                                                       tracking_uri=tracking_uri))
    except Exception as err:  # noqa: BLE001 -- MLflow raises its own and HTTP errors; all mean "not fetched"
        shutil.rmtree(tmp, ignore_errors=True)
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"cannot fetch {uri} from MLflow at {tracking_uri}: {type(err).__name__}: {first}") from None
    if not (got / MODEL_FILE).is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"{uri} holds no {MODEL_FILE}: not a tokenfeed model export")
    if target.exists():
        shutil.rmtree(target)
    os.rename(got, target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target
