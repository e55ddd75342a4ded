"""Read and write the vector file formats users bring: .npy, and the TEXMEX .fvecs/.bvecs/.ivecs.

TEXMEX files store each row as a little-endian int32 dimension followed by that many values
(float32, uint8 or int32). We check that every row declares the same dimension, because a
truncated or mis-typed file otherwise turns silently into garbage vectors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_VECS = {".fvecs": np.float32, ".bvecs": np.uint8, ".ivecs": np.int32}


def read_vecs(path: str | Path) -> np.ndarray:
    """Return an (n, d) array from a .fvecs/.bvecs/.ivecs file (dtype of the file)."""
    path = Path(path)
    dtype = np.dtype(_VECS[path.suffix])
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size < 4:
        raise ValueError(f"{path}: empty or shorter than one header")
    d = int(raw[:4].view("<i4")[0])
    if d <= 0:
        raise ValueError(f"{path}: first row declares dimension {d}")
    row = 4 + d * dtype.itemsize
    if raw.size % row:
        raise ValueError(f"{path}: size {raw.size} B is not a multiple of the row size {row} B (d={d})")
    rows = raw.reshape(-1, row)
    dims = rows[:, :4].copy().view("<i4").ravel()
    if not np.all(dims == d):
        bad = int(np.argmax(dims != d))
        raise ValueError(f"{path}: row {bad} declares dimension {dims[bad]}, row 0 declares {d}")
    return rows[:, 4:].copy().view(dtype.newbyteorder("<")).astype(dtype, copy=False)


def write_vecs(path: str | Path, x: np.ndarray) -> None:
    """Write an (n, d) array in the TEXMEX format its suffix names."""
    path = Path(path)
    dtype = np.dtype(_VECS[path.suffix])
    x = np.ascontiguousarray(x, dtype=dtype)
    n, d = x.shape
    head = np.full((n, 1), d, dtype="<i4").view(np.uint8)
    np.concatenate([head, x.view(np.uint8).reshape(n, -1)], axis=1).tofile(path)


def read_vectors(path: str | Path) -> np.ndarray:
    """Read an (n, d) float32 matrix from .npy, .fvecs, .bvecs or .ivecs."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix == ".npy":
        x = np.load(path, allow_pickle=False)
    elif path.suffix in _VECS:
        x = read_vecs(path)
    else:
        raise ValueError(f"{path}: unknown vector format {path.suffix!r} (expected .npy, .fvecs, .bvecs, .ivecs)")
    if x.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D matrix, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: contains NaN or infinite values")
    return x
