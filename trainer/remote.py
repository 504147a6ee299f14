"""Exported models named by a tracker URI (``mlflow:runs:/RUN_ID/model``, ``wandb:ENTITY/PROJECT/NAME:VERSION``),
fetched once into a local cache."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from trainer.export import CONFIG_FILE, MODEL_FILE

MLFLOW_PREFIX = "mlflow:"
WANDB_PREFIX = "wandb:"
#: The W&B artifact type the trainer uploads models as (``tracking.ARTIFACT_DIR``).
WANDB_TYPE = "model"
_WANDB_REF = re.compile(r"([\w.-]+)/([\w.-]+)/([\w.-]+):([\w.-]+)")


@dataclass(frozen=True)
class WandbRef:
    """``ENTITY/PROJECT/NAME:VERSION`` of a W&B artifact; VERSION is ``vN`` or an alias (``latest``, ``best``)."""

    entity: str
    project: str
    name: str
    version: str

    @property
    def path(self) -> str:
        return f"{self.entity}/{self.project}/{self.name}:{self.version}"

    @property
    def pinned(self) -> bool:
        """A version number names fixed content; an alias can move to another version."""
        return re.fullmatch(r"v\d+", self.version) is not None


def parse_wandb(spec: str) -> WandbRef:
    """The artifact named by ``wandb:ENTITY/PROJECT/NAME:VERSION``.

    Raises:
        ValueError: another shape (the message shows the expected one).
    """
    found = _WANDB_REF.fullmatch(spec.removeprefix(WANDB_PREFIX))
    if not spec.startswith(WANDB_PREFIX) or found is None:
        raise ValueError(f"--model {spec}: expected wandb:ENTITY/PROJECT/NAME:VERSION (VERSION: v3, latest, best)")
    return WandbRef(*found.groups())


def default_cache() -> Path:
    """``$TOKENFEED_MODEL_CACHE``, else ``~/.cache/tokenfeed/models``."""
    env = os.environ.get("TOKENFEED_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tokenfeed" / "models"


def cache_path(spec: str, cache: Path) -> Path:
    """Where ``spec`` is cached: keyed by the URI alone (an MLflow run id, a W&B ``vN`` version are fixed
    content), so a cached model is found without asking the tracker anything."""
    return cache / hashlib.sha256(spec.encode()).hexdigest()[:24]


def _cached(target: Path) -> bool:
    return (target / MODEL_FILE).is_file() and (target / CONFIG_FILE).is_file()


def resolve(spec: str, cache: Path | None = None, tracking_uri: str | None = None, timeout_s: float = 30.0) -> Path:
    """A local directory (or file) holding the exported model named by ``spec``.

    Args:
        spec: a local path, ``mlflow:runs:/RUN_ID/model`` (any MLflow artifact URI of an export) or
            ``wandb:ENTITY/PROJECT/NAME:VERSION``.
        cache: where fetched models are kept (default ``default_cache()``).
        tracking_uri: the MLflow tracking server (default: ``MLFLOW_TRACKING_URI``) or the W&B base URL
            (default: ``WANDB_BASE_URL``, else W&B's own); only asked on a miss.
        timeout_s: W&B: the timeout of one API request.

    Raises:
        ValueError: an unknown scheme, or a fetch that failed (the message names the URI).
    """
    cache = cache or default_cache()
    if spec.startswith(WANDB_PREFIX):
        ref = parse_wandb(spec)
        target = cache_path(WANDB_PREFIX + ref.path, cache)
        if ref.pinned and _cached(target):
            return target  # fetched before: no tracker call at all
        return _fetch_wandb(ref, cache, tracking_uri, timeout_s)
    if not spec.startswith(MLFLOW_PREFIX):
        return Path(spec)
    uri = spec[len(MLFLOW_PREFIX):]
    target = cache_path(spec, cache)
    if _cached(target):
        return target  # fetched before: no tracker call at all
    return _fetch_mlflow(uri, target, tracking_uri)


def _install(target: Path, what: str, download: Callable[[Path], Path]) -> Path:
    """Run ``download(tmp)`` (returns the directory it filled) and move the export to ``target``: it appears
    by rename, so a cache entry is never partial.

    Raises:
        ValueError: what was downloaded holds no model file.
    """
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        got = download(tmp)
        if not (got / MODEL_FILE).is_file():
            raise ValueError(f"{what} holds no {MODEL_FILE}: not a tokenfeed model export")
        if target.exists():
            shutil.rmtree(target)
        os.rename(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"


def _fetch_mlflow(uri: str, target: Path, tracking_uri: str | None) -> Path:
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise ValueError(f"--model mlflow:{uri} needs the tracking server: --tracking-uri or MLFLOW_TRACKING_URI")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail in seconds, not minutes
    try:
        import mlflow.artifacts
    except ImportError:
        raise ValueError("--model mlflow:... needs the mlflow package: pip install 'tokenfeed[mlflow]'") from None

    def download(tmp: Path) -> Path:
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp),
                                                            tracking_uri=tracking_uri))
        except Exception as err:  # noqa: BLE001 -- MLflow raises its own and HTTP errors; all mean "not fetched"
            raise ValueError(f"cannot fetch {uri} from MLflow at {tracking_uri}: {_first_line(err)}") from None

    return _install(target, uri, download)


def _fetch_wandb(ref: WandbRef, cache: Path, base_url: str | None, timeout_s: float) -> Path:
    """Look the artifact up (an alias resolves to its ``vN``) and download it, unless that version is cached.

    The W&B public API: ``wandb.Api().artifact(path, type="model").download(root)``; credentials from
    ``WANDB_API_KEY`` (or ``wandb login``)."""
    try:
        import wandb
    except ImportError:
        raise ValueError("--model wandb:... needs the wandb package: pip install 'tokenfeed[wandb]'") from None
    where = base_url or os.environ.get("WANDB_BASE_URL") or "its default server"
    try:
        api = wandb.Api(overrides={"base_url": base_url} if base_url else None, timeout=max(1, round(timeout_s)))
        artifact = api.artifact(ref.path, type=WANDB_TYPE)
        pinned = replace(ref, version=str(artifact.version))
    except Exception as err:  # noqa: BLE001 -- wandb raises CommError, UsageError, HTTP errors: all "not found"
        hint = "; set WANDB_API_KEY (or run `wandb login`)" if "API key" in str(err) else ""
        raise ValueError(f"cannot fetch wandb:{ref.path} from W&B at {where}: {_first_line(err)}{hint}") from None
    if not ref.pinned:
        print(f"generate: wandb:{ref.path} is {pinned.version}", file=sys.stderr)
    target = cache_path(WANDB_PREFIX + pinned.path, cache)
    if _cached(target):
        return target  # this version was fetched before (under its number or another alias)

    def download(tmp: Path) -> Path:
        try:  # skip_cache: W&B's own artifact cache would keep a second copy of the weights
            return Path(artifact.download(root=str(tmp), skip_cache=True))
        except Exception as err:  # noqa: BLE001 -- as above
            raise ValueError(f"cannot download wandb:{pinned.path} from W&B at {where}: {_first_line(err)}") from None

    return _install(target, f"wandb:{pinned.path}", download)
