"""``python -m trainer.generate``: sample text from an exported model, with the tokenizer its data was made
with (kept in the export: the byte tokenizer, a tokenizer.json or a SentencePiece model)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from trainer.export import load_exported
from trainer.model import GPT
from trainer.remote import default_cache, resolve
from trainer.tokenizer import BYTE_VOCAB, ByteCodec, load_codec

__all__ = ["BYTE_VOCAB", "decode", "encode", "generate", "main", "sample_next"]


def encode(text: str) -> list[int]:
    """The server's byte tokenization of ``text``: its UTF-8 bytes (no EOS: the document goes on)."""
    return ByteCodec().encode(text)


def decode(ids: list[int]) -> str:
    """Text of byte ids; ids outside 0-255 are dropped, broken UTF-8 becomes U+FFFD."""
    return ByteCodec().decode(ids)


def sample_next(logits: torch.Tensor, top_k: int = 0, temperature: float = 1.0,
                generator: torch.Generator | None = None) -> int:
    """One token id from the last position's ``logits`` ``[vocab]``.

    ``temperature == 0`` or ``top_k == 1`` is greedy (argmax, deterministic). Otherwise sample from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits (0 = all).
    """
    if temperature < 0 or top_k < 0:
        raise ValueError(f"temperature and top_k must be >= 0, got {temperature} and {top_k}")
    if temperature == 0 or top_k == 1:
        return int(torch.argmax(logits))
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.numel():
        values, indices = torch.topk(scaled, top_k)
        choice = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=generator)
        return int(indices[choice])
    return int(torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator))


@torch.no_grad()
def generate(model: GPT, prompt: list[int], max_new_tokens: int, *, top_k: int = 0, temperature: float = 1.0,
             seed: int = 0, eos_id: int | None = None) -> list[int]:
    """Continue ``prompt`` by up to ``max_new_tokens`` ids (stopping at ``eos_id``); returns the new ids.

    The input is the last ``model.cfg.context`` tokens (a longer prompt is truncated from the left);
    an empty prompt starts a new document, as after an EOS.
    """
    device = next(model.parameters()).device
    context = model.cfg.context
    ids = list(prompt) or ([eos_id] if eos_id is not None else [0])
    generator = torch.Generator(device=device).manual_seed(seed)
    new: list[int] = []
    for _ in range(max_new_tokens):
        window = torch.tensor([ids[-context:]], dtype=torch.long, device=device)
        nxt = sample_next(model(window)[0, -1], top_k, temperature, generator)
        if nxt == eos_id:
            break
        ids.append(nxt)
        new.append(nxt)
    return new


def main(argv: list[str] | None = None) -> int:
    """Command line: print the prompt and its continuation."""
    p = argparse.ArgumentParser(prog="python -m trainer.generate", description=__doc__)
    p.add_argument("--model", required=True, help="exported model.pt (or its directory, RUN_DIR/final), "
                   "mlflow:runs:/RUN_ID/model or wandb:ENTITY/PROJECT/NAME:VERSION (fetched once into --cache-dir; "
                   "a W&B alias such as :latest is looked up each time, a version such as :v3 is not)")
    p.add_argument("--tracking-uri", help="MLflow tracking server for mlflow: models (default: MLFLOW_TRACKING_URI); "
                   "W&B base URL for wandb: models (default: WANDB_BASE_URL, else W&B's)")
    p.add_argument("--cache-dir", type=Path, default=None, help=f"fetched models (default: {default_cache()})")
    p.add_argument("--prompt", default="", help="text to continue (encoded with the model's tokenizer, "
                   "truncated to the context)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="stop after this many tokens (or at EOS)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (same as --top-k 1)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        path = resolve(args.model, args.cache_dir, args.tracking_uri)
        model, config = load_exported(path, args.device)
        codec = load_codec(path if path.is_dir() else path.parent, config)
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        top_k = 1 if args.greedy else args.top_k
        new = generate(model, codec.encode(args.prompt), args.max_new_tokens, top_k=top_k,
                       temperature=args.temperature, seed=args.seed, eos_id=config.get("eos_id"))
    except ValueError as err:
        print(f"generate: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(args.prompt + codec.decode(new) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
