"""The IVF-PQ index as plain tensors: what the artifact stores and every backend searches.

Shapes (named the same everywhere): ``d`` dim, ``nlist`` coarse cells, ``M`` subspaces,
``K = 2**nbits`` codewords per subspace, ``n`` items.

    rotation   (d, d)          float32  orthonormal R; items and centroids live in the rotated space
    centroids  (nlist, d)      float32  coarse quantizer C (rotated space)
    codebooks  (M, K, d // M)  float32  PQ codewords P of the residuals x' - C[cell]
    codes      (n, code_size)  uint8    code_size = M (8-bit) or M // 2 (4-bit, two codes a byte,
                                         low nibble first, as Faiss packs them)
    offsets    (nlist + 1,)    int64    rows offsets[c]:offsets[c+1] are cell c (CSR layout)
    ids        n strings                item ids in row order

Decoding (Poeem eq. 2-3): x_hat = R^T (C[cell] + concat_m P[m, code_m]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

METRICS = ("ip", "l2")
NBITS = (4, 8)


@dataclass(frozen=True)
class IVFPQ:
    """Immutable IVF-PQ index data; `check()` proves it is internally consistent."""

    metric: str
    rotation: torch.Tensor
    centroids: torch.Tensor
    codebooks: torch.Tensor
    codes: torch.Tensor
    offsets: torch.Tensor
    ids: np.ndarray  # (n,) object array of str, row order
    nbits: int

    @property
    def d(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def nlist(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def M(self) -> int:  # noqa: N802 - the field's name for it
        return int(self.codebooks.shape[0])

    @property
    def K(self) -> int:  # noqa: N802
        return 1 << self.nbits

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])

    @property
    def code_size(self) -> int:
        return code_size(self.M, self.nbits)

    def list_sizes(self) -> torch.Tensor:
        """(nlist,) int64 number of items in each cell."""
        return self.offsets[1:] - self.offsets[:-1]

    def check(self) -> None:
        """Raise ValueError naming the first inconsistency between the tensors."""
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r} is not one of {METRICS}")
        if self.nbits not in NBITS:
            raise ValueError(f"nbits {self.nbits} is not one of {NBITS}")
        d, nlist, M, K = self.d, self.nlist, self.M, self.K
        if d % M:
            raise ValueError(f"dim {d} is not divisible by M={M}")
        if self.nbits == 4 and M % 2:
            raise ValueError(f"4-bit codes need an even M, got M={M}")
        expect = {
            "rotation": ((d, d), torch.float32),
            "centroids": ((nlist, d), torch.float32),
            "codebooks": ((M, K, d // M), torch.float32),
            "codes": ((self.n, self.code_size), torch.uint8),
            "offsets": ((nlist + 1,), torch.int64),
        }
        for name, (shape, dtype) in expect.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{name}: expected shape {shape} {dtype}, got {tuple(t.shape)} {t.dtype}")
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != self.n:
            raise ValueError(
                f"offsets: must run from 0 to n={self.n}, got {int(self.offsets[0])}..{int(self.offsets[-1])}"
            )
        if bool((self.list_sizes() < 0).any()):
            raise ValueError("offsets: not non-decreasing")
        if len(self.ids) != self.n:
            raise ValueError(f"ids: {len(self.ids)} ids for {self.n} items")
        for name in ("rotation", "centroids", "codebooks"):
            if not bool(torch.isfinite(getattr(self, name)).all()):
                raise ValueError(f"{name}: contains NaN or infinite values")
        eye = torch.eye(d, dtype=torch.float64)
        err = float((self.rotation.double() @ self.rotation.double().T - eye).abs().max())
        if err > 1e-3:
            raise ValueError(f"rotation: not orthonormal (max |R R^T - I| = {err:.2e})")

    def unpacked_codes(self, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """(r, M) uint8 codes of the given rows, 4-bit codes unpacked."""
        c = self.codes[rows]
        return unpack_codes(c, self.nbits)

    def cells(self) -> torch.Tensor:
        """(n,) int64 cell of every row, from the CSR offsets."""
        return torch.repeat_interleave(torch.arange(self.nlist), self.list_sizes())

    def decode(self, rows: torch.Tensor | None = None, rotated: bool = False) -> torch.Tensor:
        """(r, d) float32 reconstructed vectors x_hat of the given rows (all rows if None)."""
        rows = torch.arange(self.n) if rows is None else torch.as_tensor(rows, dtype=torch.int64)
        xr = self.decode_rotated(self.unpacked_codes(rows), self.cells()[rows])
        return xr if rotated else xr @ self.rotation

    def decode_rotated(self, codes: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """(r, M) unpacked codes and (r,) cells -> (r, d) x_hat' in the rotated space."""
        from .encode import decode_rotated

        return decode_rotated(self.centroids, self.codebooks, cells, codes)


def code_size(M: int, nbits: int) -> int:
    """Bytes per item: M for 8-bit codes, M / 2 for 4-bit codes."""
    return M if nbits == 8 else (M + 1) // 2


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """(n, M) codes in [0, K) -> (n, code_size) uint8, two 4-bit codes a byte, low nibble first."""
    codes = codes.to(torch.uint8)
    if nbits == 8:
        return codes.contiguous()
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, nbits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: (n, code_size) uint8 -> (n, M) uint8."""
    if nbits == 8:
        return packed
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=2).reshape(packed.shape[0], -1)
