"""The trainer's validated configuration: YAML, then ``a.b=value`` overrides, then CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import importlib.util

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from tokenfeed import wire

#: Added to ``seed`` to get the evaluation stream's seed when ``eval.dataset`` is not set.
EVAL_SEED_OFFSET = 1_000_003


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field to change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """A small GPT: pre-norm decoder blocks, learned positions; vocabulary from the server."""

    layers: int = Field(default=2, ge=1, description="Number of transformer blocks.")
    width: int = Field(default=128, ge=8, description="Hidden size (embedding width); a multiple of `heads`.")
    heads: int = Field(default=4, ge=1, description="Attention heads per block.")
    context: int = Field(default=128, ge=2, description="Longest sequence the model accepts; at least `data.seq_len`.")
    mlp_ratio: int = Field(default=4, ge=1, description="MLP hidden size as a multiple of `width`.")
    document_mask: bool = Field(default=False, description="Mask attention across the documents packed into a row "
                                                    "(from position_ids); costs the fused causal kernel.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.width % self.heads:
            raise ValueError(f"model.heads={self.heads} must divide model.width={self.width}")
        return self


class OptimConfig(_Section):
    """AdamW with linear warmup then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""

    lr: float = Field(default=3e-3, ge=0, description="Peak learning rate, reached after `warmup_steps`.")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="Final learning rate as a fraction of `lr`.")
    warmup_steps: int = Field(default=20, ge=0, description="Steps of linear warmup from 0 to `lr`.")
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW decoupled weight decay (matrices only).")
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW (beta1, beta2).")
    eps: float = Field(default=1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(default=1.0, ge=0, description="Clip the global gradient norm to this; 0 = no clipping.")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"each beta must be in [0, 1), got {betas}")
        return betas


class DataConfig(_Section):
    """Where the batches come from: one stream per rank from a tokenfeed server."""

    address: str | list[str] = Field(default="127.0.0.1:50051", description="Server `host:port`, or a list of "
                                     "replicas (rank r uses address r % len).")
    dataset: str = Field(default="stdlib", min_length=1, description="Dataset name the server serves.")
    seq_len: int = Field(default=128, ge=1, description="Tokens per row.")
    packing: str = Field(default=wire.DEFAULT_PACKING, description="How the server packs documents into rows: "
                         "`concat` (back to back), `bfd` (best-fit whole documents) or `pad` (one per row).")
    batch_size: int = Field(default=8, ge=1, description="Rows per micro-batch per rank.")
    num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes per rank (0 is the fast path: "
                                                  "the gRPC client does its I/O outside the GIL).")
    reconnect_deadline_s: float = Field(default=10.0, gt=0, description="Give up (and fail, naming the address) when "
                                        "the server cannot be reached for this long.")

    @field_validator("packing")
    @classmethod
    def _known_packing(cls, packing: str) -> str:
        if packing not in wire.PACKINGS:
            raise ValueError(f"must be one of {', '.join(wire.PACKINGS)}")
        return packing

    @field_validator("address")
    @classmethod
    def _nonempty(cls, address: str | list[str]) -> str | list[str]:
        if not address or (isinstance(address, list) and not all(address)):
            raise ValueError("name at least one server as host:port")
        return address


class EvalConfig(_Section):
    """Evaluation on a held-out stream, best-checkpoint tracking and early stopping.

    The held-out stream is ``dataset`` when set (a separate dataset the server serves: a real
    held-out split). When unset it is the training dataset read in another order, seeded with
    ``seed + 1_000_003``: a fixed sample that tracks fit but is *not* disjoint from training data.
    The eval set is the stream's first ``batches`` global batches, the same for any world size.
    """

    every: int = Field(default=50, ge=0, description="Evaluate every N steps (and at the last step); 0 = never.")
    batches: int = Field(default=8, ge=1, description="Global batches in the eval set.")
    dataset: str | None = Field(default=None, description="Held-out dataset name; None = the training dataset "
                                                  "with seed + 1_000_003.")
    patience: int = Field(default=0, ge=0, description="Stop after this many evaluations without improvement; 0 = off.")
    min_delta: float = Field(default=0.0, ge=0, description="An eval loss must beat the best by more than this.")


class CheckpointConfig(_Section):
    """DCP checkpoints under ``RUN_DIR/checkpoints``: model, optimizer, scheduler, RNG, data cursors."""

    every: int = Field(default=50, ge=0, description="Checkpoint every N steps; 0 = only the last step and new bests.")
    keep: int = Field(default=2, ge=1, description="Newest checkpoints to keep (the best one is kept until exported).")


#: Tracking backends, and the package (and extra) each needs.
TRACKING_BACKENDS = {"none": None, "mlflow": "mlflow", "wandb": "wandb"}


class TrackingConfig(_Section):
    """Experiment tracking from rank 0: step metrics, config and metadata, the best model as an artifact.

    The tracker run's id is kept in ``RUN_DIR/tracking.json``, so a resumed run continues the same
    tracker run. MLflow needs ``uri`` (a tracking server); W&B reads its usual settings
    (``WANDB_API_KEY``, ``WANDB_MODE=offline``) and ``uri`` as its base URL when set.

    MLflow credentials come from ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` or
    ``MLFLOW_TRACKING_TOKEN``, or from ``username``/``password``/``token`` here (these win). Secrets are
    ``SecretStr``: every dump of the config (``config.yaml``, checkpoints, tracker params) shows ``**********``.
    """

    backend: str = Field(default="none", description="`none`, `mlflow` or `wandb`.")
    project: str = Field(default="tokenfeed", min_length=1, description="W&B project.")
    experiment: str = Field(default="tokenfeed", min_length=1, description="MLflow experiment (created if new).")
    run_name: str | None = Field(default=None, description="Display name of the tracker run; None = the run "
                                 "directory's name.")
    uri: str | None = Field(default=None, description="MLflow tracking URI (required for mlflow); W&B base URL.")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags of the tracker run (W&B: `key:value`).")
    timeout_s: float = Field(default=30.0, gt=0, description="Timeout of one tracker request.")
    retries: int = Field(default=2, ge=0, description="Retries of a failed tracker request (MLflow), with backoff.")
    retry_after_s: float = Field(default=30.0, ge=0, description="After a failed send mid-run, steps queue for this "
                                 "long before the next try (training goes on).")
    max_queued_steps: int = Field(default=10_000, ge=1, description="Steps held in memory while the tracker is down; "
                                  "later ones are sent from metrics.jsonl once it answers.")
    username: str | None = Field(default=None, description="MLflow basic-auth user (default: "
                                 "MLFLOW_TRACKING_USERNAME).")
    password: SecretStr | None = Field(default=None, description="MLflow basic-auth password (default: "
                                       "MLFLOW_TRACKING_PASSWORD); never written out.")
    token: SecretStr | None = Field(default=None, description="MLflow bearer token (default: MLFLOW_TRACKING_TOKEN); "
                                    "never written out.")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, backend: str) -> str:
        if backend not in TRACKING_BACKENDS:
            raise ValueError(f"must be one of {', '.join(TRACKING_BACKENDS)}")
        package = TRACKING_BACKENDS[backend]
        # checked here so that a missing package fails at start, not after training
        if package is not None and importlib.util.find_spec(package) is None:
            raise ValueError(f"backend {backend!r} needs the {package} package: pip install 'tokenfeed[{package}]'")
        return backend

    @field_validator("uri")
    @classmethod
    def _no_userinfo(cls, uri: str | None) -> str | None:
        # the URI is logged, written to config.yaml and sent as a param: no credentials in it
        if uri and "@" in uri.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError("must not hold credentials (user:password@); use MLFLOW_TRACKING_USERNAME and "
                             "MLFLOW_TRACKING_PASSWORD, or tracking.username and tracking.password")
        return uri

    @model_validator(mode="after")
    def _mlflow_needs_uri(self) -> TrackingConfig:
        if self.backend == "mlflow" and not self.uri:
            raise ValueError("tracking.uri: backend 'mlflow' needs the tracking server's URI, e.g. "
                             "http://127.0.0.1:5000")
        return self


class TrainConfig(_Section):
    """Everything a training run needs; the defaults train a tiny model on a CPU in seconds.

    Sections are frozen, so their default instances can be shared.
    """

    run_dir: Path = Field(default=Path("runs/default"), description="Checkpoints, metrics.jsonl, final model, marker.")
    seed: int = Field(default=0, ge=0, description="Seeds model init and the data order.")
    max_steps: int = Field(default=200, ge=1, description="Optimizer steps to train.")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimizer step on each rank.")
    log_every: int = Field(default=10, ge=1, description="Log a summary line every N steps (metrics.jsonl gets all).")
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="Prometheus port of rank 0 (rank r "
                                     "serves port + r); None or 0 = off.")
    model: ModelConfig = Field(default=ModelConfig(), description="Model shape.")
    optim: OptimConfig = Field(default=OptimConfig(), description="Optimizer and schedule.")
    data: DataConfig = Field(default=DataConfig(), description="Training data stream.")
    eval: EvalConfig = Field(default=EvalConfig(), description="Evaluation and early stopping.")
    checkpoint: CheckpointConfig = Field(default=CheckpointConfig(), description="Checkpointing.")
    tracking: TrackingConfig = Field(default=TrackingConfig(), description="Experiment tracking (MLflow, W&B).")

    @model_validator(mode="after")
    def _fits_context(self) -> TrainConfig:
        if self.data.seq_len > self.model.context:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.context={self.model.context}; "
                             "raise model.context or lower data.seq_len")
        return self

    @property
    def eval_dataset(self) -> str:
        """The dataset of the held-out stream."""
        return self.eval.dataset or self.data.dataset

    @property
    def eval_seed(self) -> int:
        """The seed of the held-out stream (the training seed when a separate dataset is named)."""
        return self.seed if self.eval.dataset else self.seed + EVAL_SEED_OFFSET


#: Fields whose rejected value is not repeated in an error message: it may hold a secret.
_UNECHOED = ("password", "token", "uri")


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(config)"
        shown = "input" in e and not isinstance(e["input"], dict) and e["loc"][-1] not in _UNECHOED
        got = f" (got {e['input']!r})" if shown else ""
        lines.append(f"{field}: {e['msg']}{got}")
    return "invalid trainer config: " + "; ".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["model.width=256", "data.address=[a:1, b:2]"]`` -> a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load ``path`` (YAML; None = defaults), apply nested ``overrides`` and validate.

    Raises:
        ConfigError: unreadable YAML or an invalid field (the message names it).
    """
    raw: Any = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read trainer config {path}: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"trainer config {path} must be a mapping of fields, got {type(raw).__name__}")
    try:
        return TrainConfig.model_validate(_merge(raw, overrides or {}))
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def to_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML (written to the run directory for the record)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
