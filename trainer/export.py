"""The final model: a DCP checkpoint consolidated into one ``model.pt`` plus ``config.json``."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from trainer.config import ModelConfig
from trainer.model import GPT

FORMAT = "tokenfeed-gpt/1"
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"


def export(checkpoint: Path, out: Path, model_cfg: ModelConfig, meta: dict[str, Any],
           tokenizer: Path | None = None) -> Path:
    """Consolidate the model of ``checkpoint`` (any world size) into ``out/model.pt`` on this process.

    Needs no process group: one rank calls it. ``out`` appears only when complete (rename).

    Args:
        checkpoint: a DCP checkpoint directory written by ``trainer.checkpoint.save``.
        out: the directory to create (replaced if it exists).
        model_cfg: the model's shape.
        meta: must hold ``vocab_size``; also recorded: tokenizer ids, step, eval loss, ...
        tokenizer: the data's tokenizer file (``trainer.tokenizer``), copied beside the model.
    """
    with torch.device("meta"):
        model = GPT(model_cfg, int(meta["vocab_size"]))
    state = model.to_empty(device="cpu").state_dict()
    with warnings.catch_warnings():  # "torch.distributed ... assuming a single process": that is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": state}, checkpoint_id=checkpoint, no_dist=True)
    return write_export(out, state, model_cfg, {**meta, "checkpoint": str(checkpoint)}, tokenizer)


def write_export(out: Path, state: dict[str, torch.Tensor], model_cfg: ModelConfig, meta: dict[str, Any],
                 tokenizer: Path | None = None) -> Path:
    """Write ``out/model.pt`` (weights + config), ``out/config.json`` and the ``tokenizer`` file (its
    name is recorded as ``tokenizer_file``); ``out`` appears by rename."""
    config = {"format": FORMAT, "model": model_cfg.model_dump(), **meta,
              "tokenizer_file": tokenizer.name if tokenizer is not None else None}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, tmp / tokenizer.name)
    torch.save({"format": FORMAT, "config": config, "model": state}, tmp / MODEL_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    if out.exists() or out.is_symlink():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out / MODEL_FILE


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """The model in an exported ``model.pt`` (or its directory), in eval mode, and its config.

    Raises:
        ValueError: not a file this trainer exported.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise ValueError(f"cannot read model file {path}: {err}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tokenfeed model export (format {FORMAT})")
    config = blob["config"]
    with torch.device(device):
        model = GPT(ModelConfig(**config["model"]), int(config["vocab_size"]))
    model.load_state_dict(blob["model"])
    return model.eval(), config
