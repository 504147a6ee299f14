"""Mixtures: a dataset whose rows interleave other datasets' rows by weights that may follow a
schedule over the mixture's rows. The interleaving is a deterministic largest-deficit rule, so
the realised share of each component stays within one row of its target at every point, and a
position is fully described by each component's own position."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from server.config import MixtureConfig
from server.stages.dataset import Dataset
from server.stages.sources import ShardSpec
from server.errors import ConfigError


class WeightSchedule:
    """Weights per component as a function of the mixture row: piecewise constant ("step") or
    linear between points. Weights are normalised at every point."""

    def __init__(self, names: list[str], points: list[tuple[int, dict[str, float]]], linear: bool) -> None:
        self.names = names
        self.at = np.array([p[0] for p in points], dtype=np.float64)
        w = np.array([[p[1].get(n, 0.0) for n in names] for p in points], dtype=np.float64)
        self.weights = w / w.sum(axis=1, keepdims=True)
        self.linear = linear and len(points) > 1
        # cumulative expected rows at each point
        seg = np.diff(self.at)[:, None]
        area = seg * ((self.weights[:-1] + self.weights[1:]) / 2 if self.linear else self.weights[:-1])
        self._cum = np.vstack([np.zeros((1, len(names))), np.cumsum(area, axis=0)])

    def weights_at(self, rows: np.ndarray | float) -> np.ndarray:
        """Normalised weights at each of ``rows`` (``[n, C]``, or ``[C]`` for a scalar)."""
        r = np.atleast_1d(np.asarray(rows, dtype=np.float64))
        i = np.clip(np.searchsorted(self.at, r, side="right") - 1, 0, len(self.at) - 1)
        w = self.weights[i]
        if self.linear:
            j = np.minimum(i + 1, len(self.at) - 1)
            span = np.where(j > i, self.at[j] - self.at[i], 1.0)
            f = np.clip((r - self.at[i]) / span, 0.0, 1.0)[:, None] * (j > i)[:, None]
            w = w + f * (self.weights[j] - w)
        picked: np.ndarray = w if np.ndim(rows) else w[0]
        return picked

    def cumulative(self, rows: np.ndarray) -> np.ndarray:
        """Expected rows of each component among the first ``rows`` rows, ``[n, C]`` (before
        the first point, the first point's weights apply)."""
        r = np.asarray(rows, dtype=np.float64)
        i = np.searchsorted(self.at, r, side="right") - 1
        ic = np.clip(i, 0, len(self.at) - 1)
        dx = (r - self.at[ic])[:, None]
        rate = (self.weights_at(r) + self.weights[ic]) / 2 if self.linear else self.weights[ic]
        out = self._cum[ic] + self.weights[0] * self.at[0] + dx * rate
        before_first: np.ndarray = np.where((i < 0)[:, None], self.weights[0] * r[:, None], out)
        return before_first

    def assign(self, start: int, counts: list[int], n: int) -> list[int]:
        """Components of rows ``start .. start+n-1``: each row goes to the component furthest
        behind its target. ``counts`` (each component's rows before ``start``) is updated."""
        targets = self.cumulative(np.arange(start + 1, start + n + 1)).tolist()
        out = []
        ks = range(1, len(counts))
        for target in targets:
            c, most = 0, target[0] - counts[0]
            for k in ks:  # the largest deficit; on a tie the first component (a plain loop: 3x max(key=))
                if target[k] - counts[k] > most:
                    c, most = k, target[k] - counts[k]
            counts[c] += 1
            out.append(c)
        return out


class EditedSchedule(WeightSchedule):
    """A schedule whose weights are ``weights`` from mixture row ``start`` on (a data plan's
    weights edit): before it, ``base``'s; after it, each component's expected rows grow from
    ``base``'s expected rows at ``start`` by the new weights. The largest-deficit rule then keeps
    every component within one row of these targets, as for a configured schedule."""

    def __init__(self, base: WeightSchedule, start: int, weights: dict[str, float]) -> None:
        unknown = sorted(set(weights) - set(base.names))
        if unknown:
            raise ValueError(f"weights for {', '.join(map(repr, unknown))}: not in the mixture "
                             f"(its components: {', '.join(base.names)})")
        w = np.array([weights.get(n, 0.0) for n in base.names], dtype=np.float64)
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"weights must be finite, 0 or more, and not all 0; got {weights}")
        self.names, self.base, self.start = base.names, base, start
        self.new = w / w.sum()
        self._at_start = base.cumulative(np.array([start]))[0]

    def weights_at(self, rows: np.ndarray | float) -> np.ndarray:
        r = np.atleast_1d(np.asarray(rows, dtype=np.float64))
        w = np.where((r >= self.start)[:, None], self.new, self.base.weights_at(r))
        return w if np.ndim(rows) else w[0]

    def cumulative(self, rows: np.ndarray) -> np.ndarray:
        r = np.asarray(rows, dtype=np.float64)
        after = self._at_start + (r - self.start)[:, None] * self.new
        return np.where((r > self.start)[:, None], after, self.base.cumulative(r))


class Mixture:
    """A served mixture: quacks like ``Dataset`` where the stream and the service need it."""

    def __init__(self, name: str, components: list[Dataset], schedule: WeightSchedule, spec: dict[str, Any]) -> None:
        self.name = name
        self.components = components
        self.schedule = schedule
        first = components[0]
        self.info, self.dtype = first.info, first.dtype
        self.rows_served = [0] * len(components)
        h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
        for ds in components:
            h.update(ds.fingerprint.encode())
        self.fingerprint = h.hexdigest()[:16]

    @property
    def shards(self) -> list[ShardSpec]:
        return [s for ds in self.components for s in ds.shards]

    @property
    def parts(self) -> list[Dataset]:
        return self.components

    @property
    def num_shards(self) -> int:
        return sum(ds.num_shards for ds in self.components)

    def describe(self) -> dict[str, Any]:
        parts = [ds.describe() for ds in self.components]
        known = all(p["tokens"] >= 0 for p in parts)
        return {
            "name": self.name, "tokenizer": self.info.name, "vocab_size": self.info.vocab_size,
            "eos_id": self.info.eos_id, "pad_id": self.info.pad_id,
            "bos_id": -1 if self.info.bos_id is None else self.info.bos_id,
            "fingerprint": self.fingerprint, "num_shards": self.num_shards,
            "documents": sum(p["documents"] for p in parts) if known else -1,
            "tokens": sum(p["tokens"] for p in parts) if known else -1,
            "shards": [s for p in parts for s in p["shards"]],
            "bad_records": {k: v for p in parts for k, v in p["bad_records"].items()},
        }

    def sources(self) -> list[dict[str, Any]]:
        weights = self.schedule.weights_at(sum(self.rows_served))
        return [{"name": ds.name, "weight": float(w), "tokens": ds.total_tokens(), "rows_served": n}
                for ds, w, n in zip(self.components, weights, self.rows_served)]


def build_mixture(name: str, config: MixtureConfig, datasets: dict[str, Dataset]) -> Mixture:
    """A mixture of already-built plain datasets; their tokenizers must agree."""
    names = list(config.weights)
    components = [datasets[n] for n in names]
    infos = {(ds.info.identity, ds.info.vocab_size, ds.info.eos_id, ds.info.pad_id) for ds in components}
    if len(infos) > 1:
        raise ConfigError(f"datasets.{name}.mixture: components {names} use different tokenizers; "
                          "a mixture's rows must share one vocabulary")
    schedule = WeightSchedule(names, config.points(), linear=config.interpolation == "linear")
    return Mixture(name, components, schedule, config.model_dump())
