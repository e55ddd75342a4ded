"""One encode / decode path for IVF-PQ: assign a coarse cell and PQ codes to vectors, and rebuild
x_hat from them. The two-step builder, the trainable layer (`model.layer`), `jointpq index`, the
service's delta segment and the drift report all go through here, so an item indexed by any of
them gets the same cell and codes bit for bit.

Shapes: x (n, d) item embeddings; R (d, d) rotation; C (nlist, d) centroids; P (M, K, d // M)
codebooks; cells (n,) int64; codes (n, M) uint8 (unpacked; `ivfpq.pack_codes` packs 4-bit ones).

    x' = R x;  cell = nearest C (max inner product for "ip", as the search probes)
    codes_m = nearest P[m] to (x' - C[cell])_m;   x_hat' = C[cell] + concat_m P[m, codes_m]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .kmeans import assign

CHUNK = 1 << 16  # rows encoded at a time: bounds the (chunk, nlist) and (M, chunk, K) score blocks


def assign_cells(xr: torch.Tensor, centroids: torch.Tensor, metric: str) -> torch.Tensor:
    """(n, d) rotated vectors -> (n,) coarse cell: nearest (l2) or max inner product (ip)."""
    return assign(xr[None], centroids[None], "ip" if metric == "ip" else "l2")[0]


def encode_pq(residuals: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """(n, d) residuals, (M, K, dsub) codebooks -> (n, M) uint8 nearest codeword per subspace.

    With short sub-vectors (dsub <= 8, e.g. 384-d at M=48) the GEMM formulation is memory-bound
    (K scores per subspace written, then argmax-ed: 12k floats per item); on the CPU Faiss's
    fused SIMD encoder is then ~3x faster and gives the same codes, so it is used when installed."""
    M, K, ds = codebooks.shape
    if ds <= 8 and K == 256 and residuals.device.type == "cpu" and residuals.shape[0] >= 4096:
        from . import faiss_interop

        if faiss_interop.available():
            import faiss

            pq = faiss.ProductQuantizer(M * ds, M, 8)
            faiss.copy_array_to_vector(codebooks.detach().float().contiguous().numpy().ravel(), pq.centroids)
            x = residuals.detach().float().contiguous().numpy()
            return torch.from_numpy(pq.compute_codes(x)).reshape(-1, M)
    out = torch.empty(residuals.shape[0], M, dtype=torch.uint8, device=residuals.device)
    for s in range(0, residuals.shape[0], CHUNK):
        sub = residuals[s : s + CHUNK].reshape(-1, M, ds).transpose(0, 1)
        out[s : s + CHUNK] = assign(sub, codebooks).T.to(torch.uint8)
    return out


def decode_rotated(
    centroids: torch.Tensor, codebooks: torch.Tensor, cells: torch.Tensor, codes: torch.Tensor
) -> torch.Tensor:
    """(n,) cells and (n, M) unpacked codes -> (n, d) x_hat' = C[cell] + concat_m P[m, code_m]
    (Poeem eq. 2-3). Differentiable in `centroids` and `codebooks` (the layer trains through it)."""
    M = codebooks.shape[0]
    parts = codebooks[torch.arange(M, device=codebooks.device), codes.long()]  # (n, M, dsub)
    return centroids[cells] + parts.reshape(codes.shape[0], -1)


@dataclass(frozen=True)
class Quantizer:
    """A frozen IVF-PQ quantizer (rotation, centroids, codebooks): what indexes a new item.

    It is the part of an artifact that does not depend on the items, so an artifact's quantizer
    indexes any vector the same way training indexed the corpus."""

    metric: str
    rotation: torch.Tensor  # (d, d)
    centroids: torch.Tensor  # (nlist, d)
    codebooks: torch.Tensor  # (M, K, dsub)

    @classmethod
    def of(cls, index) -> Quantizer:
        """The quantizer of an `ivfpq.IVFPQ` (or anything with those four attributes)."""
        return cls(index.metric, index.rotation, index.centroids, index.codebooks)

    @property
    def d(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def M(self) -> int:  # noqa: N802 - the field's name for it
        return int(self.codebooks.shape[0])

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d) -> (n, d) x' = R x, float32 on the quantizer's device."""
        R = self.rotation
        return x.to(R.device, torch.float32) @ R.T

    @torch.no_grad()
    def encode_rotated(self, xr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, d) rotated vectors -> cells (n,) int64 and codes (n, M) uint8, on xr's device."""
        cells = assign_cells(xr, self.centroids.detach(), self.metric)
        return cells, encode_pq(xr - self.centroids.detach()[cells], self.codebooks.detach())

    @torch.no_grad()
    def encode(self, x: torch.Tensor, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, d) embeddings -> cells (n,) int64 and codes (n, M) uint8 on the CPU, `chunk` rows at a time."""
        cells, codes, _ = self.encode_with_error(x, chunk)
        return cells, codes

    @torch.no_grad()
    def encode_with_error(self, x: torch.Tensor, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As `encode`, plus each row's squared distortion (n,) (the drift report's input)."""
        parts = list(self.encode_chunks(x, chunk))
        if not parts:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, self.M, dtype=torch.uint8), torch.zeros(0)
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]

    @torch.no_grad()
    def encode_chunks(
        self, x: torch.Tensor, chunk: int = CHUNK
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per `chunk` rows of x: (cells, codes, squared distortion ||x' - x_hat'||^2), on the CPU."""
        for s in range(0, len(x), chunk):
            xr = self.rotate(x[s : s + chunk])
            cells, codes = self.encode_rotated(xr)
            err = ((xr - self.decode_rotated(cells, codes)) ** 2).sum(1)
            yield cells.cpu(), codes.cpu(), err.cpu()

    def decode_rotated(self, cells: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """(n,) cells, (n, M) unpacked codes -> (n, d) x_hat' in the rotated space."""
        dev = self.centroids.device
        return decode_rotated(self.centroids.detach(), self.codebooks.detach(), cells.to(dev), codes.to(dev))

    def decode(self, cells: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """(n,) cells, (n, M) unpacked codes -> (n, d) x_hat = R^T x_hat' in the input space."""
        return self.decode_rotated(cells, codes) @ self.rotation

    @torch.no_grad()
    def distortion(self, x: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
        """(n, d) embeddings -> (n,) squared quantization error ||x' - x_hat'||^2 (float32, CPU)."""
        return self.encode_with_error(x, chunk)[2]
