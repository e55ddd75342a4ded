"""What every training mode shares: its inputs, its result, the encoder factory, the two-step
start the guard measures against, and the distillation term the modes can add."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from index import build_ivfpq
from index.ivfpq import IVFPQ

from ..config import CommonConfig, ConfigError, option
from ..encoders import HashedNgramEncoder, HeadEncoder, MiniLMEncoder, TextEncoder


@dataclass
class SupervisedConfig(CommonConfig):
    """The labelled modes' shared fields: the optional distillation term (`DistillTerm`)."""

    distill_weight: float = option(0.0, "weight of the ListNet term against the frozen base model (0: labels only)")
    distill_top_k: int = option(50, "teacher candidates per query for the distillation term")
    distill_temperature: float = option(0.05, "softmax temperature of the distillation term")

    def validate(self) -> None:
        super().validate()
        if self.distill_weight < 0 or self.distill_top_k < 1 or self.distill_temperature <= 0:
            raise ConfigError("--distill-weight must be >= 0, --distill-top-k >= 1, --distill-temperature > 0")


@dataclass
class TrainInputs:
    """Optional inputs beside the data set and the config.

    encoder: the pretrained encoder to start from (default: built from `cfg.encoder`);
    item_embeddings: (n, d) float32 of the starting encoder over the corpus, in corpus order
        (a cache: skips encoding the corpus);
    memo: text -> the frozen base encoder's (d,) embedding (pre-fills `minilm-head` and teacher);
    queries: label-free training query texts (distill; default: `model.queries.training_queries`);
    query_source: what the manifest says about where `queries` came from;
    start: the two-step index (`two_step_start`) over the starting item embeddings with this
        config, when the caller built it already (the benchmark's own two-step row)."""

    encoder: TextEncoder | None = None
    item_embeddings: torch.Tensor | None = None
    item_ids: list[str] | None = None  # ids of those rows
    memo: dict[str, torch.Tensor] | None = None
    queries: list[str] | None = None
    query_source: str | None = None
    start: IVFPQ | None = None
    split: str = "train"


@dataclass
class TrainResult:
    query_encoder: TextEncoder
    item_encoder: TextEncoder
    index: IVFPQ
    history: list[dict[str, float]]
    timings: dict[str, float]
    validation: dict[str, Any] = field(default_factory=dict)  # the guard's record (curve, selected)
    canary: dict[str, Any] | None = None  # label-free canaries: texts and the teacher's top-10 ids
    # (n, d) the item tower's embeddings the index was built from, corpus order: the drift
    # report's baseline (quantization distortion of the trained items)
    item_embeddings: torch.Tensor | None = None
    item_ids: list[str] | None = None  # ids of those rows
    # under torchrun: world size, backend, per-rank batch and each rank's sha256 of the trained
    # state (`model.distributed.check_identical`); None in one process
    distributed: dict[str, Any] | None = None

    @property
    def selected(self) -> str:
        return self.validation.get("selected", "trained")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_encoder(encoder: str, dim: int = 128, memo: dict[str, torch.Tensor] | None = None) -> TextEncoder:
    """The named encoder; `minilm-head` is frozen MiniLM + a trainable head (`memo`: text -> cached embedding)."""
    if encoder == "minilm":
        return MiniLMEncoder()
    if encoder == "minilm-head":
        return HeadEncoder(MiniLMEncoder(), memo)
    if encoder == "hashed":
        return HashedNgramEncoder(dim=dim)
    raise ConfigError(f"--encoder {encoder!r} is not one of ('hashed', 'minilm', 'minilm-head')")


def snapshot_encoder(encoder: TextEncoder) -> TextEncoder:
    """A frozen eval-mode copy of `encoder` that later training cannot change. A head encoder's
    frozen base (90 MB for MiniLM) and memo are shared, not copied: only the head trains."""
    if isinstance(encoder, HeadEncoder):
        out = HeadEncoder(encoder.base, encoder.memo).to(next(encoder.head.parameters()).device)
        out.head.load_state_dict(encoder.head.state_dict())
        out.memoize = encoder.memoize
        return out.eval()
    import copy

    return copy.deepcopy(encoder).eval()


def base_embeddings(encoder: TextEncoder, memo: dict[str, torch.Tensor] | None, texts: list[str]) -> torch.Tensor:
    """(n, d) frozen base embeddings of `texts` (through `memo` when it has them): the teacher."""
    head = encoder if isinstance(encoder, HeadEncoder) else HeadEncoder(encoder, memo if memo is not None else {})
    if memo is not None and head.memo is not memo:
        head.memo.update(memo)
    out = []
    for s in range(0, len(texts), 256):
        out.append(head.tokenize(texts[s : s + 256])["base"])
    return torch.cat(out) if out else torch.zeros(0, encoder.dim)


def two_step_start(items: torch.Tensor, ids: list[str], cfg: CommonConfig, given: IVFPQ | None = None) -> IVFPQ:
    """The recipe users would otherwise run on the same embeddings: OPQ + IVF-PQ (our builder).
    `given` (a prebuilt one) is used when its shape and items match the config."""
    if given is not None:
        if (given.M, given.nlist, given.nbits, given.metric, given.n) != (
            cfg.M,
            cfg.nlist,
            cfg.nbits,
            cfg.metric,
            len(ids),
        ):
            raise ValueError("the given two-step start does not match the config (M, nlist, nbits, metric, items)")
        return given
    return build_ivfpq(
        items, nlist=cfg.nlist, M=cfg.M, nbits=cfg.nbits, metric=cfg.metric, opq=True, ids=ids, seed=cfg.seed,
        niter=cfg.kmeans_iters,
    )  # fmt: skip


def student_scores(q: torch.Tensor, x: torch.Tensor, metric: str) -> torch.Tensor:
    """(B, d) rotated queries, (U, d) rotated reconstructions -> (B, U) scores ranking as the
    engine ranks: inner product, or -||q - x||^2 up to the query's own norm for l2."""
    s = q @ x.T
    return s if metric == "ip" else 2 * s - (x * x).sum(1)[None, :]


Snapshot = Callable[[], Any]


def labelled_validation(data: Any, split: str, cfg: CommonConfig) -> tuple[list[str], Any]:
    """(training query ids, Validation or None): judged queries of `split` minus a seeded
    held-aside part scored by nDCG@10 against its qrels (none held aside when the guard is off)."""
    from ..guard import Validation, hold_aside

    positives = data.positives(split)
    qids = sorted(q for q, docs in positives.items() if docs)
    if not cfg.guard:
        return qids, None
    train_q, val_q = hold_aside(qids, cfg.val_fraction, cfg.val_min, cfg.val_max, cfg.seed)
    if not val_q:
        return qids, None
    qrels = data.qrels[split]
    return train_q, Validation([data.queries[q] for q in val_q], [qrels[q] for q in val_q], "ndcg@10", cfg.val_nprobe)


@dataclass
class DistillTerm:
    """The distillation term a supervised mode adds (`--distill-weight`): the teacher's top-K of
    each training query over the float items, precomputed; per batch the union of the batch's
    candidates, teacher scores from the frozen embeddings, ListNet against the student's scores.

    queries (Nq, d) and items (N, d): frozen base embeddings; `row` maps query text -> row."""

    queries: torch.Tensor
    items: torch.Tensor
    row: dict[str, int]
    top: torch.Tensor
    temperature: float
    gen: torch.Generator

    @classmethod
    def build(cls, texts: list[str], queries: torch.Tensor, items: torch.Tensor, k: int, temperature: float, seed: int):
        from ..distillation import teacher_top

        return cls(queries, items, {t: i for i, t in enumerate(texts)}, teacher_top(queries, items, k), temperature,
                   torch.Generator().manual_seed(seed))  # fmt: skip

    def candidates(self, texts: list[str], extra_random: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of the batch's queries, candidate item rows in corpus order)."""
        from ..distillation import batch_candidates

        q = torch.tensor([self.row[t] for t in texts])
        return q, batch_candidates(self.top, q, len(self.items), extra_random, self.gen)

    def loss(self, q_rows: torch.Tensor, cand: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """student (B, U) scores of the batch's queries over `cand` -> ListNet against the teacher."""
        from ..distillation import listnet

        teacher = self.queries[q_rows] @ self.items[cand].T
        return listnet(teacher.to(student.device), student, self.temperature)
