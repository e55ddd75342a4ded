"""Data-parallel training under `torchrun` (DDP semantics), and a no-op everywhere else.

    torchrun --nproc_per_node 2 -m service.cli train --mode poeem --data ... --out ...

torchrun starts N copies of the program with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT set; `init` joins them into one process group (gloo on CPU, NCCL on CUDA, each rank
on cuda:LOCAL_RANK). Without those variables (or with WORLD_SIZE 1) nothing here communicates:
every helper returns its input, so a single process trains exactly as before, bit for bit.

How the trainers use it (`model.modes.poeem`, `model.modes.distill`):

* Every rank runs the same program on the same data with the same seeds, so batch order,
  negatives and candidate draws are the same sequence as in one process. Each rank takes its
  1/N share (`shard`) of every global batch: the configured batch size stays the global one.
* In-batch negatives are the global batch's: `embed_sharded` embeds a rank's share of the texts
  and `all_gather`s the embeddings of all ranks, with gradients flowing back to the rank that
  embedded each row.
* Gradients are averaged across ranks after `backward` (`average_gradients`, what
  DistributedDataParallel does; explicit because one step calls the encoders and the indexing
  layer several times, and the rotation's gradient lives on a leaf that is no parameter).
  Identical averaged gradients + identical optimiser states keep every rank's weights, rotation,
  centroids and codebooks bit-identical; `check_identical` proves it at the end of training.
* What steers training and is computed outside the step (k-means warm start, two-step start,
  item assignment, mined hard negatives, validation scores, the time limit) runs on rank 0 and
  is broadcast (`from_main`, `broadcast_`, `agree`), so no rank can drift on a near-tie.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

_state: dict[str, Any] = {}  # backend, device, local_rank once `init` made (or found) a group


def launched() -> bool:
    """Started by torchrun (or any launcher setting the same variables) with more than one process."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """A process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) in a single process."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """Rank 0 (the one that logs, shows progress bars and writes the artifact). Before `init` it
    reads torchrun's RANK, so a launched program can stay quiet on the other ranks from the start."""
    if is_distributed():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def backend() -> str | None:
    return str(dist.get_backend()) if is_distributed() else None


def init(device: str | torch.device = "auto", timeout_s: float = 1800.0) -> torch.device:
    """Join torchrun's process group (once; later calls return the same device) and return the
    device this rank trains on. `device` as in the training config: "auto" / "cuda" put rank r on
    cuda:LOCAL_RANK with NCCL; "cpu" (or no CUDA) uses gloo. Outside torchrun: nothing is
    initialised and `resolve_device(device)` is returned."""
    from index import resolve_device

    if is_distributed():
        return _state.get("device") or resolve_device(device)
    dev = resolve_device(device)
    if not launched():
        return dev
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        name = "nccl"
    else:
        name = "gloo"
    kwargs: dict[str, Any] = {"device_id": dev} if name == "nccl" else {}
    dist.init_process_group(name, init_method="env://", timeout=timedelta(seconds=timeout_s), **kwargs)
    _state.update(backend=name, device=dev, local_rank=local_rank)
    return dev


def device(device: str | torch.device = "auto") -> torch.device:
    """The device a trainer puts its modules on: `init`'s under torchrun, else `resolve_device`."""
    from index import resolve_device

    if is_distributed() and "device" in _state:
        return _state["device"]
    return resolve_device(device)


def shutdown(barrier: bool = True) -> None:
    """Leave the process group (no-op when there is none). `barrier`: wait for every rank first,
    so rank 0 can finish writing the artifact while the others wait; pass False on an error path
    (a rank that failed must not wait for peers stuck in another collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if barrier:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        _state.clear()


def record() -> dict[str, Any] | None:
    """What the artifact's manifest says about the run's distribution (None in one process)."""
    if not is_distributed():
        return None
    return {"world_size": dist.get_world_size(), "backend": backend()}


# -- sharding -----------------------------------------------------------------------------------
def shard_sizes(n: int) -> list[int]:
    """Rows each rank takes of n: contiguous shares differing by at most one (the first n % N
    ranks take one more)."""
    _, size = world()
    q, r = divmod(n, size)
    return [q + (i < r) for i in range(size)]


def shard(n: int) -> tuple[int, int]:
    """[start, stop) of this rank's rows of n (`shard_sizes`); (0, n) in one process."""
    rank, _ = world()
    sizes = shard_sizes(n)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


# -- collectives ----------------------------------------------------------------------------------
def _comm_device() -> torch.device:
    """Where tensors must be for a collective: the rank's GPU under NCCL, else the CPU."""
    return _state["device"] if _state.get("backend") == "nccl" else torch.device("cpu")


class _AllGather(torch.autograd.Function):
    """(n_r, ...) on rank r -> (sum n_r, ...) rows of rank 0, then 1, ... Backward: the gradient of
    a row is the sum of every rank's gradient for it, handed to the rank that owns the row (as
    `torch.distributed.nn.functional.all_gather`; that one needs equal sizes, this pads)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        rank, size = world()
        ctx.sizes, ctx.rank = sizes, rank
        top = max(sizes)
        padded = x.new_zeros((top, *x.shape[1:]))
        padded[: len(x)] = x
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss may use every row: sum their gradients
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather(x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """x (n_r, ...) on every rank -> (sum_r n_r, ...) the ranks' rows in rank order, the same on
    every rank, differentiable: the gradient reaching rank r's x is the sum over ranks of the
    gradients of its rows (so with DDP's averaging, a loss that every rank computes whole over the
    gathered batch trains exactly as one process over that batch). `sizes` (n_0, ..., n_{N-1})
    when known (they may differ); otherwise they are gathered first. Returns x in one process."""
    if not is_distributed():
        return x
    if sizes is None:
        n = torch.tensor([len(x)], device=x.device)
        counts = [torch.zeros_like(n) for _ in range(world()[1])]
        dist.all_gather(counts, n)
        sizes = [int(c) for c in counts]
    if len(x) != sizes[world()[0]]:
        raise ValueError(f"rank {world()[0]} holds {len(x)} rows, sizes say {sizes[world()[0]]}")
    return _AllGather.apply(x.contiguous(), list(sizes))


def embed_sharded(encoder: Any, texts: Sequence[str]) -> torch.Tensor:
    """(n,) texts -> (n, d) `encoder.embed` of all of them, in order, each rank embedding only its
    share (`shard`) and gathering the others' (`all_gather`): the global batch's embeddings for
    in-batch negatives, at 1/N of the encoder's cost per rank; gradients of a row go back to
    the rank that embedded it. One process: exactly `encoder.embed(texts)`."""
    if not is_distributed():
        return encoder.embed(texts)
    lo, hi = shard(len(texts))
    # more ranks than texts: an empty share still joins the collectives
    local = encoder.embed(texts[lo:hi]) if hi > lo else torch.zeros(0, encoder.dim, device=device())
    if torch.is_grad_enabled() and not local.requires_grad:
        # the gather's backward is a collective: every rank must reach it, so every share takes part
        local = local.detach().requires_grad_()
    return all_gather(local, shard_sizes(len(texts)))


@torch.no_grad()
def average_gradients(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor's .grad by its mean over ranks, as DistributedDataParallel does after
    backward (one flat all-reduce per dtype). A tensor without a gradient on some rank counts as
    zero there; one without a gradient on every rank keeps None (the optimiser skips it, as in
    one process). No-op in one process."""
    if not is_distributed() or not tensors:
        return
    _, size = world()
    dev = _comm_device()
    have = torch.tensor([t.grad is not None for t in tensors], dtype=torch.int32, device=dev)
    dist.all_reduce(have, op=dist.ReduceOp.MAX)
    used = [t for t, h in zip(tensors, have.tolist(), strict=True) if h]
    for dtype in dict.fromkeys(t.dtype for t in used):
        group = [t for t in used if t.dtype == dtype]
        flat = torch.cat([(t.grad if t.grad is not None else torch.zeros_like(t)).reshape(-1).to(dev) for t in group])
        dist.all_reduce(flat)
        flat /= size
        offset = 0
        for t in group:
            part = flat[offset : offset + t.numel()].view_as(t).to(t.device)
            offset += t.numel()
            if t.grad is None:
                t.grad = part.clone()
            else:
                t.grad.copy_(part)


@torch.no_grad()
def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor in place with rank `src`'s (same shapes on every rank): the state
    rank 0 computed alone (k-means warm start, item assignments) or DDP's start (weights).
    Bool tensors travel as uint8. No-op in one process."""
    if not is_distributed():
        return
    dev = _comm_device()
    for t in tensors:
        buf = t.to(dev, torch.uint8 if t.dtype == torch.bool else t.dtype).contiguous()
        dist.broadcast(buf, src)
        t.copy_(buf.to(t.device, t.dtype))


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` (picklable, CPU tensors only) on every rank; `obj` in one process."""
    if not is_distributed():
        return obj
    box = [obj if world()[0] == src else None]
    dist.broadcast_object_list(box, src)
    return box[0]  # type: ignore[return-value]


def from_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) computed on rank 0 only and its result broadcast (a CPU tensor as a
    tensor, anything else pickled): one answer for what steers every rank (k-means, mined
    negatives, validation scores). One process: just fn(*args, **kwargs)."""
    if not is_distributed():
        return fn(*args, **kwargs)
    main = world()[0] == 0
    out = fn(*args, **kwargs) if main else None
    if main and isinstance(out, torch.Tensor):
        head = broadcast_object(("tensor", tuple(out.shape), out.dtype, out.device))
    else:
        head = broadcast_object(("object", out))
    if head[0] == "object":
        return head[1]
    _, shape, dtype, where = head
    buf = out.contiguous() if main else torch.empty(shape, dtype=dtype)  # type: ignore[union-attr]
    buf = buf.to(_comm_device())
    dist.broadcast(buf, 0)
    return buf.to(device() if where.type == "cuda" else where)  # rank 0's GPU -> this rank's


def agree(flag: bool) -> bool:
    """Rank 0's `flag` on every rank: decisions from wall clocks (a time limit) must be one."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], device=_comm_device())
    dist.broadcast(t, 0)
    return bool(t.item())


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum over ranks of each value (float64): per-rank partial losses -> the global batch's."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


# -- checks ----------------------------------------------------------------------------------------
def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `tensors` (CPU copies)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_identical(tensors: dict[str, torch.Tensor], what: str) -> dict[str, Any] | None:
    """Every rank's digest of `tensors`; RuntimeError when ranks differ (averaged gradients and
    broadcasts keep them bit-identical, so a difference is a bug, not noise). Returns the
    manifest's record (`record()` + the per-rank digests), None in one process."""
    if not is_distributed():
        return None
    mine = digest(tensors)
    every: list[Any] = [None] * world()[1]
    dist.all_gather_object(every, mine)
    if len(set(every)) != 1:
        raise RuntimeError(f"{what} differs across ranks after training (sha256 per rank: {every})")
    return (record() or {}) | {"state_sha256": every}


def check_same(obj: Any, what: str) -> None:
    """RuntimeError unless `obj` (picklable: the training pairs, query texts) is the same on every
    rank: ranks that read different data would gather inconsistent batches."""
    if not is_distributed():
        return
    mine = hashlib.sha256(pickle.dumps(obj, protocol=4)).hexdigest()
    every: list[Any] = [None] * world()[1]
    dist.all_gather_object(every, mine)
    if len(set(every)) != 1:
        raise RuntimeError(f"{what} differ across ranks: every rank must load the same data with the same seed")
