"""The trainable indexing layer (Poeem, SIGIR 2021): rotation, coarse + product quantization with
straight-through gradients, warm start, distortion loss. Its outputs are the item embeddings the
retrieval loss sees; its state is the index. Indexing = one forward pass over the items.

For an item embedding x (d,):

    x' = R x                                    R orthonormal, a product of Givens rotations
    c  = nearest coarse centroid of x'          (max inner product for metric "ip", as the search probes)
    r  = x' - C[c];  j_m = nearest codeword of r_m in P[m]
    x_hat' = C[c] + concat_m P[m, j_m]          (Poeem eq. 2-3)
    out = x + (R^T x_hat' - x).detach()         straight-through: forward quantized, backward identity
    distortion = ||sg(x') - x_hat'||^2 + beta ||x' - sg(x_hat')||^2   (codebooks, commitment)

R is not an nn.Parameter: it is updated by steepest block coordinate descent over Givens planes
(`rotation_step`): dL/dtheta_ij at theta = 0 is S_ij = (G R^T - R G^T)_ij for G = dL/dR, so the
planes with the largest |S_ij| (a greedy matching of disjoint pairs) are rotated by
-lr * S_ij / max|S| (lr = the steepest plane's angle: the gradient's scale does not matter).
Disjoint Givens rotations commute, so one step is a vectorised update of 2 rows per plane, and R
stays orthonormal to rounding (kept in float64) with no SVD in the loop.
"""

from __future__ import annotations

import torch
from torch import nn

from index.build import assemble, train_opq
from index.encode import Quantizer, decode_rotated
from index.ivfpq import IVFPQ, METRICS, NBITS
from index.kmeans import assign, kmeans


class IndexingLayer(nn.Module):
    """IVF-PQ as a layer. Before `warm_start` it passes inputs through (and remembers a buffer of
    them); after, it quantizes. `to_ivfpq` turns item embeddings into a searchable index."""

    def __init__(
        self,
        d: int,
        nlist: int,
        M: int,
        nbits: int = 8,
        metric: str = "ip",
        rotation: bool = True,
        beta: float = 0.25,
        buffer_size: int = 16384,
    ):
        super().__init__()
        if metric not in METRICS or nbits not in NBITS or d % M:
            raise ValueError(f"bad layer shape: metric={metric!r}, nbits={nbits}, d={d} must divide by M={M}")
        self.d, self.nlist, self.M, self.nbits, self.metric = d, nlist, M, nbits, metric
        self.K, self.learn_rotation, self.beta, self.buffer_size = 1 << nbits, rotation, beta, buffer_size
        self.register_buffer("rotation", torch.eye(d, dtype=torch.float64))
        self.register_buffer("initialized", torch.tensor(False))
        self.centroids = nn.Parameter(torch.zeros(nlist, d))
        self.codebooks = nn.Parameter(torch.zeros(M, self.K, d // M))
        self._seen: list[torch.Tensor] = []
        self._seen_n = 0
        self._R: torch.Tensor | None = None  # leaf for this step's dL/dR

    # -- warm start ---------------------------------------------------------------------------
    def remember(self, x: torch.Tensor) -> None:
        """Keep the latest `buffer_size` embeddings seen unquantized, for `warm_start`."""
        self._seen.append(x.detach().float().cpu())
        self._seen_n += len(x)
        while self._seen_n - len(self._seen[0]) >= self.buffer_size:
            self._seen_n -= len(self._seen.pop(0))

    @torch.no_grad()
    def warm_start(self, x: torch.Tensor | None = None, seed: int = 0, niter: int = 20, opq: bool = False) -> None:
        """Initialise C and P by k-means on `x` (default: the remembered embeddings) in the rotated
        space; k-means repairs empty clusters, so every codeword starts in use. `opq` first sets R
        by OPQ on `x` (the Givens steps then refine it)."""
        x = torch.cat(self._seen) if x is None else x.detach().float().cpu()
        if len(x) < max(self.nlist, self.K):
            raise ValueError(
                f"warm start needs at least max(nlist, K) = {max(self.nlist, self.K)} embeddings, got {len(x)}"
            )
        if opq:
            self.rotation.copy_(train_opq(x, self.M, self.nbits, seed=seed).double())
        xr = x @ self.rotation.float().cpu().T
        C = kmeans(xr, self.nlist, niter=niter, seed=seed, metric=self.metric)
        cells = assign(xr[None], C[None], self.metric)[0]
        res = (xr - C[cells]).view(len(x), self.M, -1).transpose(0, 1)
        P = kmeans(res, self.K, niter=niter, seed=seed + 1)
        self.centroids.copy_(C)
        self.codebooks.copy_(P)
        self.initialized.fill_(True)
        self._seen, self._seen_n = [], 0

    # -- forward ------------------------------------------------------------------------------
    def rotation_leaf(self) -> torch.Tensor:
        """R as a float32 leaf that collects dL/dR until the next `rotation_step`."""
        if self._R is None or self._R.device != self.rotation.device:
            self._R = self.rotation.float().detach().requires_grad_(self.learn_rotation and self.training)
        return self._R

    def quantize(self, xr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, d) rotated -> x_hat' (B, d), cells (B,), codes (B, M); x_hat' is differentiable in C, P."""
        cells, codes = self.quantizer().encode_rotated(xr.detach())
        codes = codes.long()  # (B, M)
        return decode_rotated(self.centroids, self.codebooks, cells, codes), cells, codes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, d) embeddings -> (quantized embeddings with straight-through gradient, distortion loss)."""
        if not bool(self.initialized):
            if self.training:
                self.remember(x)
            return x, x.new_zeros(())
        R = self.rotation_leaf()
        xr = x @ R.T
        x_hat_r, _, _ = self.quantize(xr)
        # codebooks move to the data; the encoder (and R) commit to the codebooks
        distortion = ((xr.detach() - x_hat_r) ** 2).sum(1).mean() + self.beta * ((xr - x_hat_r.detach()) ** 2).sum(
            1
        ).mean()
        x_hat = x_hat_r @ R.detach()  # back to the input space: R^T x_hat'
        return x + (x_hat - x).detach(), distortion

    # -- rotation learning ----------------------------------------------------------------------
    @torch.no_grad()
    def rotation_step(self, lr: float, planes: int | None = None) -> int:
        """Apply the Givens update from the accumulated dL/dR; returns the number of planes turned."""
        R = self._R
        self._R = None
        if R is None or R.grad is None or not self.learn_rotation:
            return 0
        G, Rd = R.grad.double(), self.rotation
        S = G @ Rd.T - Rd @ G.T  # (d, d) skew: dL/dtheta for the plane (i, j)
        i, j = torch.triu_indices(self.d, self.d, 1, device=S.device)
        score = S[i, j].abs()
        peak = float(score.max())
        if peak == 0:
            return 0
        # greedy matching, steepest disjoint planes first, among the 4d steepest (enough in practice)
        top = torch.topk(score, min(len(score), 4 * self.d)).indices.tolist()
        ii, jj = i.tolist(), j.tolist()
        used, pi, pj = set(), [], []
        limit = planes or self.d // 2
        for o in top:
            a, b = ii[o], jj[o]
            if a not in used and b not in used:
                used.update((a, b))
                pi.append(a)
                pj.append(b)
                if len(pi) == limit:
                    break
        pi_t, pj_t = torch.tensor(pi, device=S.device), torch.tensor(pj, device=S.device)
        # lr is the angle (radians) of the steepest plane; the others turn in proportion to their slope
        theta = -lr * S[pi_t, pj_t] / peak
        c, s = torch.cos(theta)[:, None], torch.sin(theta)[:, None]
        ri, rj = Rd[pi_t].clone(), Rd[pj_t].clone()
        # R <- G(i, j, theta) R with G = I + (cos - 1)(e_i e_i^T + e_j e_j^T) + sin (e_i e_j^T - e_j e_i^T)
        Rd[pi_t] = c * ri + s * rj
        Rd[pj_t] = -s * ri + c * rj
        return len(pi)

    # -- distributed training (`model.distributed`) ----------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The quantizer's state: rotation (d, d) float64, centroids (nlist, d), codebooks
        (M, K, d/M), initialized (): what must be identical on every rank."""
        return {
            "rotation": self.rotation,
            "centroids": self.centroids.data,
            "codebooks": self.codebooks.data,
            "initialized": self.initialized,
        }

    @torch.no_grad()
    def broadcast_state(self) -> None:
        """Under torchrun, every rank takes rank 0's quantizer state (after a warm start that ran on
        rank 0 alone); the remembered buffer is dropped, as `warm_start` drops it. One process: nothing."""
        from . import distributed

        if not distributed.is_distributed():
            return
        distributed.broadcast_(list(self.state_tensors().values()))
        self._seen, self._seen_n, self._R = [], 0, None

    # -- indexing -------------------------------------------------------------------------------
    def quantizer(self) -> Quantizer:
        """The layer's current state as the frozen quantizer an artifact ships (`index.encode`)."""
        return Quantizer(self.metric, self.rotation.float(), self.centroids.detach(), self.codebooks.detach())

    @torch.no_grad()
    def to_ivfpq(self, items: torch.Tensor, ids: list[str], progress: bool = False) -> IVFPQ:
        """Index (n, d) item embeddings: rotate, assign, encode, sort by cell. One forward pass,
        through `index.encode.Quantizer`, the path `jointpq index` and the service take too."""
        from tqdm.auto import tqdm

        q = self.quantizer()
        cells, codes = [], []
        chunks = q.encode_chunks(items)
        for c, j, _ in tqdm(chunks, desc="index items", disable=not progress, unit="chunk"):
            cells.append(c)
            codes.append(j)
        cells_t = torch.cat(cells) if cells else torch.zeros(0, dtype=torch.int64)
        codes_t = torch.cat(codes) if codes else torch.zeros(0, self.M, dtype=torch.uint8)
        return assemble(self.metric, q.rotation, q.centroids, q.codebooks, cells_t, codes_t, ids, self.nbits)
