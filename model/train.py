"""Training entry point: resolve a config (mode, preset, the user's values), run the mode, write
one artifact. The modes themselves live in `model.modes` (one module each); the defaults in their
config classes (`model.config`), the named presets in `model.presets`.

    cfg = resolve_config("distill", preset="scifact", M=8)
    result = train(data, cfg, TrainInputs(item_embeddings=cache))
    write_trained_artifact(out, result, cfg, data_path, metrics, training_canaries(result, data, "test", cfg))

Under `torchrun --nproc_per_node N` (`model.distributed`), `train` joins the process group and
poeem / distill train data-parallel: each rank takes 1/N of every global batch (`--batch-size`
stays the global batch), gradients are averaged, the quantizer stays identical on every rank;
the caller writes the artifact on rank 0 (`distributed.is_main()`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from index import write_artifact
from index.canary import CANARY, CanarySet

from . import distributed
from .config import CommonConfig, ConfigError
from .data import RetrievalData
from .modes import MODES, TrainInputs, TrainResult, get_mode
from .modes.base import make_encoder, seed_everything
from .presets import preset_values
from .towers import tower_files

__all__ = [
    "DISTRIBUTED_MODES",
    "MODES",
    "TrainInputs",
    "TrainResult",
    "make_encoder",
    "resolve_config",
    "seed_everything",
    "train",
    "training_canaries",
    "write_trained_artifact",
]


def resolve_config(
    mode: str, preset: str | None = None, given: dict[str, Any] | None = None, **values: Any
) -> CommonConfig:
    """The mode's config: its defaults, then the preset's values (those the mode has), then
    `given` (the user's flags: a flag the mode lacks is an error) and `values` (code's own,
    same rule); encoder-dependent defaults resolved, validated."""
    from .config import build_config

    cls = get_mode(mode).config
    user = {**(given or {}), **values}
    merged = {**preset_values(preset), **user}
    return build_config(cls, merged, given=set(user))


DISTRIBUTED_MODES = ("poeem", "distill")  # the modes that train data-parallel under torchrun


def train(
    data: RetrievalData, cfg: CommonConfig, inputs: TrainInputs | None = None, progress: bool = True
) -> TrainResult:
    """Run `cfg`'s mode on `data` (see `TrainInputs` for caches and query sources). Launched by
    torchrun with several processes, it first joins their process group (`distributed.init`: gloo
    on CPU, NCCL with each rank on cuda:LOCAL_RANK) and trains data-parallel; every rank returns
    a result, rank 0's is the one to write."""
    distributed.init(cfg.device)
    check_distributed(cfg)
    return get_mode(cfg.mode).train(data, cfg, inputs or TrainInputs(), progress)


def check_distributed(cfg: CommonConfig) -> None:
    """ConfigError unless `cfg` can train across the current process group (always fine in one
    process): a mode that trains data-parallel, and a global batch that splits evenly over ranks."""
    _, size = distributed.world()
    if size == 1:
        return
    if cfg.mode not in DISTRIBUTED_MODES:
        raise ConfigError(
            f"--mode {cfg.mode} trains in one process; under torchrun use --mode {' or '.join(DISTRIBUTED_MODES)}"
            " (or run it without torchrun)"
        )
    if cfg.batch_size % size:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} must divide by the {size} processes (torchrun --nproc_per_node):"
            f" it is the global batch, each rank takes batch/{size}"
        )


def training_canaries(
    result: TrainResult, data: RetrievalData, split: str | None, cfg: CommonConfig, n: int = 32, k: int = 100
) -> CanarySet | None:
    """The artifact's quality gate (`index.canary`): up to `n` judged queries of `split` with their
    relevant ids; without labels, held-aside queries with the float model's top-10 (the gate then
    measures agreement with the float model). A service refuses a later reload whose recall on
    them drops below `cfg.canary_margin` x today's."""
    from index import Index
    from index.canary import make_canaries

    positives = data.positives(split) if split and split in data.qrels else {}
    qids = sorted(q for q, docs in positives.items() if docs and q in data.queries)
    if qids:
        qids = random.Random(cfg.seed).sample(qids, min(n, len(qids)))
        texts = [data.queries[q] for q in qids]
        expected = [sorted(positives[q]) for q in qids]
    elif result.canary and result.canary.get("texts"):
        texts, expected = list(result.canary["texts"])[:n], list(result.canary["expected"])[:n]
    else:
        return None
    vectors = result.query_encoder.encode(texts).numpy()
    idx = Index.in_memory(result.index)

    def search(x, k, nprobe):
        return idx.search(x, k, nprobe)[1]

    nprobe = min(16, result.index.nlist)
    return make_canaries(vectors, expected, search, texts, k, nprobe, margin=cfg.canary_margin)


def write_trained_artifact(
    out: str | Path,
    result: TrainResult,
    cfg: CommonConfig,
    data_path: str,
    metrics: dict | None = None,
    canaries: CanarySet | None = None,
    preset: str | None = None,
) -> Path:
    """Query encoder + index + ids (+ canaries) as one artifact; the manifest records how it was
    made: the whole resolved config, the preset, the validation curve and what was selected."""
    training = {
        "mode": cfg.mode,
        "data": data_path,
        "preset": preset,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "selected": result.selected,
        "validation": result.validation,
        "timings": result.timings,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "steps": len(result.history),
        "metrics": metrics or {},
        "query_encoder": result.query_encoder.config(),
        "applied_seq": 0,  # the live-update log entries folded in (service/items, jointpq compact)
    }
    extra, training["item_encoder"] = tower_files(result.query_encoder, result.item_encoder, onnx=cfg.encoder_precision)
    training["encoder_precision"] = cfg.encoder_precision if "encoder/onnx.json" in extra else "fp32"
    if result.item_embeddings is not None and result.item_ids is not None:
        from index.drift import baseline

        training["drift_baseline"] = baseline(result.index, result.item_embeddings, result.item_ids)
    if result.distributed is not None:  # torchrun: world size, backend, per-rank batch, state digests
        training["distributed"] = result.distributed
    if canaries is not None:
        extra[CANARY] = canaries.dumps()
    return write_artifact(out, result.index, training=training, extra_files=extra)
