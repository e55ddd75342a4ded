"""`load_index`: the one entry point the service and outside checks use.

    idx = load_index(path, device="auto", backend="auto")
    scores, ids = idx.search(queries, k=10, nprobe=16)

Backends: ``torch`` (CPU or CUDA) and ``faiss`` (CPU). ``backend="auto"`` picks faiss when it
is installed and the device is the CPU, else torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from . import faiss_interop
from .artifact import Manifest, read_artifact
from .errors import SearchError
from .ivfpq import IVFPQ
from .search import TorchSearcher, resolve_device

BACKENDS = ("auto", "torch", "faiss")
DEFAULT_NPROBE = 16


class Searcher(Protocol):
    name: str
    device: torch.device

    def search_rows(self, queries, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class Index:
    """A loaded, verified artifact bound to one search backend."""

    path: Path | None  # None for an index built in memory (training, benchmarks)
    manifest: Manifest | None
    data: IVFPQ
    searcher: Searcher

    @classmethod
    def in_memory(cls, data: IVFPQ, device: str | torch.device = "cpu", backend: str = "torch") -> Index:
        """Serve an `IVFPQ` that was never written (e.g. right after training), same API as loaded."""
        return cls(None, None, data, make_searcher(data, device, backend))

    @property
    def backend(self) -> str:
        return self.searcher.name

    @property
    def device(self) -> torch.device:
        return self.searcher.device

    @property
    def version(self) -> str:
        return self.manifest.version if self.manifest else "in-memory"

    @property
    def ids(self) -> np.ndarray:
        return self.data.ids

    def search_rows(self, queries, k: int = 10, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Faiss-style result: scores (B, k) float32 and rows (B, k) int64, -1 where no hit."""
        return self.searcher.search_rows(queries, k, DEFAULT_NPROBE if nprobe is None else nprobe)

    def search(self, queries, k: int = 10, nprobe: int | None = None) -> tuple[list[np.ndarray], list[list[str]]]:
        """(B, d) float32 queries -> per query the scores and item ids of its hits, best first.

        ip: inner products, descending; l2: squared distances, ascending. When the `nprobe`
        probed cells hold fewer than k items a query gets fewer hits: each row is cut to its
        real hits, never padded with placeholder ids.
        """
        scores, rows = self.search_rows(queries, k, nprobe)
        valid = rows >= 0
        out_s, out_i = [], []
        for s, r, v in zip(scores, rows, valid, strict=True):
            out_s.append(s[v])
            out_i.append(self.data.ids[r[v]].tolist())
        return out_s, out_i


def make_searcher(data: IVFPQ, device: str | torch.device = "auto", backend: str = "auto") -> Searcher:
    if backend not in BACKENDS:
        raise SearchError(f"backend {backend!r} is not one of {BACKENDS}")
    dev = resolve_device(device)
    if backend == "auto":
        backend = "faiss" if dev.type == "cpu" and faiss_interop.available() else "torch"
    if backend == "faiss":
        if dev.type != "cpu":
            raise SearchError(f"the faiss backend runs on the CPU only, not on {dev}")
        return faiss_interop.FaissSearcher(data)
    return TorchSearcher(data, dev)


def load_index(path: str | Path, device: str = "auto", backend: str = "auto", verify: bool = True) -> Index:
    """Read, verify and prepare the artifact at `path`; raises `ArtifactError` if it is bad."""
    manifest, data = read_artifact(path, verify=verify)
    return Index(Path(path), manifest, data, make_searcher(data, device, backend))
