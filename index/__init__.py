"""Inference-only index core: artifact format, IVF-PQ search (torch CPU/CUDA, Faiss), exact
search and the two-step builder. Depends on neither `model` nor `service`."""

from .artifact import Manifest, read_artifact, read_manifest, write_artifact
from .build import build_ivfpq, train_opq
from .errors import ArtifactError, DimensionMismatch, JointPQError, SearchError
from .flat import exact_search
from .ivfpq import IVFPQ
from .loader import Index, load_index, make_searcher
from .search import TorchSearcher, resolve_device

__all__ = [
    "IVFPQ",
    "ArtifactError",
    "DimensionMismatch",
    "Index",
    "JointPQError",
    "Manifest",
    "SearchError",
    "TorchSearcher",
    "build_ivfpq",
    "exact_search",
    "load_index",
    "make_searcher",
    "read_artifact",
    "read_manifest",
    "resolve_device",
    "train_opq",
    "write_artifact",
]
