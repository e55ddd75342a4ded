"""Both towers in the artifact: the query encoder (encoder/) and the item encoder, so that a
trained artifact can index new items with one forward pass (`jointpq index`, the service's
POST /admin/items) instead of a retrain.

The item tower is stored once, in the cheapest form that rebuilds it exactly, and described by
item_encoder/tower.json:

    {"tower": "shared"}               item tower = the query tower (poeem with shared towers)
    {"tower": "query-base"}           item tower = the query tower's frozen base (distill with a
                                      query head: items keep the pretrained embeddings)
    {"tower": "head-on-query-base"}   a head of its own (item_encoder/model.safetensors, head.*)
                                      on the query tower's frozen base (poeem minilm-head): 3 MB
                                      instead of a second 90 MB MiniLM
    {"tower": "own"}                  a full encoder in item_encoder/ (encoder.json, weights, ...)

Artifacts written before the item tower existed have no item_encoder/: they still load and
serve, and take vectors (not texts) for indexing; `load_item_encoder` says so.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from .encoders import ENCODER_DIR, HeadEncoder, TextEncoder, encoder_files, load_encoder

ITEM_DIR = "item_encoder"
TOWER = f"{ITEM_DIR}/tower.json"
KINDS = ("shared", "query-base", "head-on-query-base", "own")


class NoItemTower(ValueError):  # noqa: N818 - reads as the condition
    """The artifact stores no item encoder (made before item towers shipped, or vectors only)."""


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def relation(query: TextEncoder, item: TextEncoder) -> str:
    """How the item tower relates to the query tower (one of `KINDS`)."""
    if item is query:
        return "shared"
    if isinstance(query, HeadEncoder) and (item is query.base or _same_weights(item, query.base)):
        return "query-base"
    both_heads = isinstance(query, HeadEncoder) and isinstance(item, HeadEncoder)
    if both_heads and (item.base is query.base or _same_weights(item.base, query.base)):
        return "head-on-query-base"
    if type(item) is type(query) and _same_weights(item, query):
        return "shared"
    return "own"


def tower_files(
    query: TextEncoder, item: TextEncoder | None, onnx: str | None = None
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """(artifact files for both towers, the manifest's description of the item tower).
    `onnx` ("fp32" | "int8"): ONNX forms too, at that precision for the query tower; an item
    tower of its own gets float32 (the index's codes were made from float embeddings)."""
    from safetensors.torch import save

    files = encoder_files(query, onnx=onnx)
    if item is None:
        return files, {"tower": None}
    kind = relation(query, item)
    if kind == "head-on-query-base":
        assert isinstance(item, HeadEncoder)
        head = {f"head.{k}": v.detach().cpu().contiguous() for k, v in item.head.state_dict().items()}
        files[f"{ITEM_DIR}/model.safetensors"] = save(head)
    elif kind == "own":
        files.update(encoder_files(item, ITEM_DIR, onnx="fp32" if onnx else None))
    description = {"tower": kind, "config": item.config()}
    files[TOWER] = json.dumps(description, indent=2).encode()
    return files, description


def has_item_tower(artifact: str | Path) -> bool:
    return (Path(artifact) / TOWER).is_file()


def load_item_encoder(
    artifact: str | Path,
    query: TextEncoder | None = None,
    runtime: str = "torch",
    device: Any = None,
    threads: int | None = None,
) -> TextEncoder:
    """Rebuild the item tower of an artifact (already verified by the index core). `query`: the
    artifact's query tower when the caller has it loaded already (saves a second MiniLM load).
    NoItemTower when the artifact has none; ValueError naming the file when it is malformed.

    `runtime` as in `load_encoder`, always with the float32 graph: the item side must embed as
    the index's codes were made, whatever precision the query tower serves at. The tower is an
    object of its own (sharing the query tower's modules where the kind says so), so its runtime
    never changes the query tower's; a float32 session the query tower already holds is reused."""
    from safetensors.torch import load_file

    from index.artifact import read_json

    root = Path(artifact)
    if not (root / TOWER).is_file():
        raise NoItemTower(
            f"{artifact}: holds no item encoder ({TOWER} missing: made before item towers shipped);"
            " index vectors instead of texts, or retrain"
        )
    from index.errors import ArtifactError

    try:
        desc = read_json(root / TOWER, TOWER)
    except ArtifactError as e:  # unreadable / not JSON: the same ValueError as a bad value
        raise ValueError(str(e)) from None
    kind = desc.get("tower") if isinstance(desc, dict) else None
    if kind not in KINDS:
        raise ValueError(f"{TOWER}: field 'tower' must be one of {KINDS}, got {str(kind)[:40]!r}")
    if device is None:
        device = next(query.parameters()).device if query is not None else "cpu"
    if kind == "own":
        return load_encoder(root, ITEM_DIR, runtime, device, threads, precision="fp32")
    if query is None:
        query = load_encoder(root, ENCODER_DIR, device=device)

    def with_runtime(item: TextEncoder) -> TextEncoder:
        if runtime != "torch":
            from .onnx_runtime import attach

            item.runtime_info = attach(item, root / ENCODER_DIR, runtime, device, threads, "fp32", reuse=query.runtime)
        return item

    if kind == "shared":
        if runtime == "torch" and query.runtime is None:
            return query
        return with_runtime(copy.copy(query))  # same modules, a runtime of its own
    if not isinstance(query, HeadEncoder):
        raise ValueError(f"{TOWER}: tower {kind!r} needs a query encoder with a frozen base, got {query.kind!r}")
    if kind == "query-base":
        return query.base if runtime == "torch" else with_runtime(copy.copy(query.base))
    weights = root / ITEM_DIR / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{ITEM_DIR}/model.safetensors: missing (tower {kind!r} keeps its head there)")
    state = load_file(str(weights))
    expect = {"head.weight": (query.dim, query.dim), "head.bias": (query.dim,)}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != expect:
        raise ValueError(f"{ITEM_DIR}/model.safetensors: holds {shapes}, expected {expect}")
    item = HeadEncoder(query.base).to(next(query.head.parameters()).device)
    item.head.load_state_dict({k.removeprefix("head."): v for k, v in state.items()})
    item.memoize = False  # serving: every item text would stay in memory
    return with_runtime(item.eval())


def tower_fingerprint(files: dict[str, Any]) -> str | None:
    """A short hash of an artifact's encoder files (its manifest `files`): two versions with the
    same fingerprint embed item texts identically. The write-ahead log records it with every
    text it encoded, so a replay onto a retrained model encodes those texts again."""
    import hashlib

    from .onnx_export import ONNX_FP32, ONNX_INT8, ONNX_META

    derived = (ONNX_FP32, ONNX_INT8, ONNX_META)  # the ONNX forms of the same weights: items embed alike
    parts = sorted(
        (n, m.get("sha256"))
        for n, m in files.items()
        if n.startswith((f"{ENCODER_DIR}/", f"{ITEM_DIR}/")) and n.rsplit("/", 1)[-1] not in derived
    )
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16] if parts else None
