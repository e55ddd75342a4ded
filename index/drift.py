"""Drift report: does the learned quantizer still fit the catalog?

Items the model never saw can fit the trained rotation / centroids / codebooks badly: their
quantization error grows and they pile into a few coarse cells, which costs recall long before
anything fails. Two numbers tell an operator when to retrain, for the new items against the
items the index was trained on:

    distortion   mean ||x' - x_hat'||^2 (rotated space; x_hat' from the item's own cell + codes)
    cell balance largest cell / mean cell size, and the number of empty cells

The baseline (trained items) is measured once, when an artifact is written from embeddings
(training, `jointpq index`), and kept in the manifest (`training.drift_baseline`); the new
items' side accumulates as they are indexed (`jointpq index --mode add`, POST /admin/items).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .encode import Quantizer
from .ivfpq import IVFPQ

# new / trained distortion above this is flagged: the new items fit the quantizer clearly worse
DRIFT_RATIO_WARN = 1.5


def cell_balance(sizes: torch.Tensor | np.ndarray) -> dict[str, float | int]:
    """(nlist,) items per cell -> largest / mean (1 = perfectly even) and the empty cells."""
    s = torch.as_tensor(sizes, dtype=torch.float64)
    mean = float(s.mean()) if len(s) else 0.0
    return {
        "max_over_mean": round(float(s.max()) / mean, 4) if mean > 0 else 0.0,
        "empty_cells": int((s == 0).sum()),
        "nlist": len(s),
    }


def row_distortion(index: IVFPQ, x_rows: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """(n, d) embeddings in the index's row order -> (n,) ||R x - x_hat'||^2 of each row as stored
    (its shipped cell and codes, which a trainer may have fixed before moving the codebooks)."""
    q, cells, out = Quantizer.of(index), index.cells(), []
    for s in range(0, index.n, chunk):
        rows = slice(s, min(index.n, s + chunk))
        xr = q.rotate(x_rows[rows].float())
        out.append(((xr - q.decode_rotated(cells[rows], index.unpacked_codes(rows))) ** 2).sum(1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def baseline(index: IVFPQ, x: torch.Tensor, ids: list[str]) -> dict[str, Any]:
    """The trained items' side of the report: `x` (n, d) embeddings given in the order of `ids`."""
    if len(ids) != index.n or x.shape[0] != index.n:
        raise ValueError(f"{x.shape[0]} embeddings and {len(ids)} ids for an index of {index.n} items")
    pos = {str(i): r for r, i in enumerate(ids)}
    order = torch.tensor([pos[str(i)] for i in index.ids], dtype=torch.int64)
    err = row_distortion(index, x[order])
    return {
        "items": index.n,
        "distortion_mean": round(float(err.double().mean()), 6) if len(err) else None,
        "cells": cell_balance(index.list_sizes()),
    }


@dataclass
class DriftStats:
    """Running sum of the new items' distortion (cheap to update per upsert batch)."""

    items: int = 0
    distortion_sum: float = 0.0

    def add(self, distortion: torch.Tensor) -> None:
        self.items += int(distortion.numel())
        self.distortion_sum += float(distortion.double().sum())

    def merged(self, other: dict[str, Any] | None) -> DriftStats:
        """These stats plus a manifest's recorded `new_items` (an artifact made by `jointpq index`)."""
        if not other or not other.get("items"):
            return DriftStats(self.items, self.distortion_sum)
        n = int(other["items"])
        return DriftStats(self.items + n, self.distortion_sum + n * float(other.get("distortion_mean") or 0.0))

    @property
    def mean(self) -> float | None:
        return self.distortion_sum / self.items if self.items else None


def report(base: dict[str, Any] | None, new: DriftStats, sizes: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """The drift report shown in the manifest, /info and /metrics. `base`: the manifest's
    baseline (None for artifacts written before drift was recorded); `sizes`: the live items per
    cell now (base + new - deleted)."""
    trained = (base or {}).get("distortion_mean")
    ratio = round(new.mean / trained, 4) if new.mean is not None and trained else None
    return {
        "trained": base,
        "new_items": {
            "items": new.items,
            "distortion_mean": round(new.mean, 6) if new.mean is not None else None,
        },
        "distortion_ratio": ratio,
        "cells_now": cell_balance(sizes),
        "retrain_advised": bool(ratio is not None and ratio > DRIFT_RATIO_WARN),
    }
