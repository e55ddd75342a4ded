"""The text encoders in ONNX form, for ONNX Runtime: on our 2-core CPU it runs all-MiniLM-L6-v2
2-3x faster than torch does, and int8 weights double that again (`bench/encoder.py`).

What is exported is the network from token tensors to the embedding:

    graph "whole"  the encoder itself (MiniLM, the hashed n-gram encoder)
    graph "base"   a head encoder's frozen base; the residual head (one (d, d) matmul, ~10 us a
                   query) stays in torch. The item tower of a head artifact shares that base, so
                   one graph serves both towers, and an int8 query graph never touches the items.

Weights are not copied. Every initializer of the float32 graph is ONNX *external data* pointing
at the same bytes in the folder's model.safetensors (safetensors stores each tensor raw,
little-endian, row-major, at an offset its header gives), so the ONNX form adds ~0.5 MB to an
artifact, and its weights are exactly those the artifact's checksums cover. The int8 graph keeps
its quantized matrices inline (their bytes exist nowhere else) and points at model.safetensors
for the float tensors it kept (embeddings, LayerNorms, biases).

int8 (`--encoder-precision int8`, query tower only) is ONNX Runtime's dynamic quantization of
the MatMul weights, per output channel, activations quantized per batch at run time. Embedding
tables and the other ops stay float: measured on SciFact (bench/encoder.py), per-tensor scales or
quantizing every op cost far more agreement with the float model for no extra speed.

Exported files, per encoder folder (`encoder/`, and `item_encoder/` for an item tower of its own):
    model.onnx        float32 graph (external data -> model.safetensors)
    model.int8.onnx   int8 graph (query tower, when asked for)
    onnx.json         what the graphs are: graph kind, inputs, precision served, versions, and
                      the cosine to torch measured on the probe texts at export
"""

from __future__ import annotations

import io
import json
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .encoders import HashedNgramEncoder, HeadEncoder, MiniLMEncoder, TextEncoder

ONNX_FP32 = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
ONNX_META = "onnx.json"
PRECISIONS = ("fp32", "int8")
OPSET = 17
OUTPUT = "sentence_embedding"

# Texts the export and every load compare ONNX Runtime against torch on: short and long, casing,
# digits, punctuation, non-ASCII, one far past MiniLM's 256 tokens (truncation), one with no word.
PROBE_TEXTS = (
    "Vitamin D deficiency is linked to lower bone mineral density.",
    "covid",
    "What is the role of TNF-alpha in rheumatoid arthritis and how do biologics target it?",
    "BRCA1 mutations raise breast cancer risk by 45-65% by age 70.",
    "Résumé of the naïve Bayes café study (Zürich, 2019) — über-long compound words: Donaudampfschiff.",
    "blue running shoes size 44 waterproof",
    "a " * 400 + "very long text that the tokenizer truncates",
    "?!",
    "Smoking during pregnancy is associated with low birth weight and preterm delivery in several cohorts.",
    "数据 检索 向量",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "mitochondrial DNA copy number",
)


class ExportError(ValueError):
    """The encoder could not be exported or quantized (message says why)."""


class _HashedGraph(nn.Module):
    """The hashed encoder with ONNX-friendly inputs: padded feature ids (B, L) and a mask (B, L)
    instead of EmbeddingBag's flat ids + offsets (which export as a loop). Same arithmetic:
    mean of the bag's rows, MLP, L2 norm. Parameter names equal the encoder's state dict."""

    def __init__(self, enc: HashedNgramEncoder):
        super().__init__()
        self.emb, self.mlp = enc.emb, enc.mlp

    def forward(self, indices: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = self.emb.weight[indices] * mask.unsqueeze(-1)  # (B, L, emb)
        pooled = rows.sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        return nn.functional.normalize(self.mlp(pooled), dim=-1)


def graph_of(encoder: TextEncoder) -> tuple[str, TextEncoder]:
    """("whole" | "base", the encoder whose network is exported)."""
    if isinstance(encoder, HeadEncoder):
        return "base", encoder.base
    return "whole", encoder


def onnx_inputs(encoder: TextEncoder, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """The graph's inputs for `texts`: MiniLM's (B, T) int64 ids and mask (T = the batch's longest),
    the hashed encoder's (B, L) int64 feature ids and float32 mask."""
    if isinstance(encoder, MiniLMEncoder):
        t = encoder.tokenize(texts)
        return {"input_ids": t["input_ids"].numpy(), "attention_mask": t["attention_mask"].numpy()}
    if isinstance(encoder, HashedNgramEncoder):
        feats = [encoder.features(t) for t in texts]
        width = max((len(f) for f in feats), default=1)
        idx = np.zeros((len(feats), width), np.int64)
        mask = np.zeros((len(feats), width), np.float32)
        for i, f in enumerate(feats):
            idx[i, : len(f)] = f
            mask[i, : len(f)] = 1.0
        return {"indices": idx, "mask": mask}
    raise ExportError(f"no ONNX form for a {encoder.kind!r} network")


def _module_and_names(net: TextEncoder) -> tuple[nn.Module, tuple[str, ...]]:
    if isinstance(net, MiniLMEncoder):
        return net, ("input_ids", "attention_mask")
    if isinstance(net, HashedNgramEncoder):
        return _HashedGraph(net), ("indices", "mask")
    raise ExportError(f"no ONNX form for a {net.kind!r} network")


def export_graph(net: TextEncoder, fold_constants: bool = False) -> bytes:
    """The ONNX bytes of `net` (a MiniLM or hashed encoder), inputs with dynamic batch and length.

    Without constant folding every initializer keeps its parameter's name and bytes (ONNX
    Runtime folds the transposes itself when it loads the graph), which lets `link_weights`
    point them at model.safetensors; the int8 path folds, so that MatMul weights are constants
    the quantizer can find."""
    module, names = _module_and_names(net)
    was_training = net.training
    net.eval()
    attention = _eager_attention(net)
    example = {k: torch.from_numpy(v) for k, v in onnx_inputs(net, ["probe text one", "a second probe"]).items()}
    axes = {n: {0: "batch", 1: "length"} for n in names} | {OUTPUT: {0: "batch"}}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's tracer warnings are about branches we never take
            torch.onnx.export(
                module, tuple(example[n] for n in names), buf, input_names=list(names), output_names=[OUTPUT],
                dynamic_axes=axes, opset_version=OPSET, do_constant_folding=fold_constants, dynamo=False,
            )  # fmt: skip
    except Exception as e:  # the exporter raises many kinds; one error type for the callers
        raise ExportError(f"torch.onnx.export of the {net.kind} encoder failed: {type(e).__name__}: {e}") from e
    finally:
        net.train(was_training)
        if attention is not None:
            net.bert.set_attn_implementation(attention)
    return buf.getvalue()


def _eager_attention(net: TextEncoder) -> str | None:
    """Export BERT with its plain (eager) attention: ONNX Runtime runs that graph 1.3x faster on
    256-token abstracts than the scaled-dot-product export (measured, 2 threads); same outputs.
    Returns the implementation to restore, None when there is nothing to switch."""
    bert = getattr(net, "bert", None)
    current = getattr(getattr(bert, "config", None), "_attn_implementation", None)
    if bert is None or current in (None, "eager") or not hasattr(bert, "set_attn_implementation"):
        return None
    bert.set_attn_implementation("eager")
    return current


def safetensors_offsets(blob: bytes) -> dict[str, tuple[int, int, str, tuple[int, ...]]]:
    """name -> (absolute byte offset, length, dtype, shape) of each tensor in a safetensors file."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        out[name] = (8 + n + begin, end - begin, meta["dtype"], tuple(meta["shape"]))
    return out


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "U8": np.uint8, "I8": np.int8}


def link_weights(model_bytes: bytes, weights: bytes, location: str, prefix: str = "") -> tuple[bytes, int]:
    """Point every initializer whose bytes equal a tensor of `weights` (a safetensors blob, stored
    beside the graph as `location`) at those bytes, as ONNX external data; `prefix` maps the
    graph's names to the blob's (a head's base: "base."). Returns (graph bytes, tensors linked).
    Equality is checked byte for byte, so a link can never change a weight."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(model_bytes)
    table = safetensors_offsets(weights)
    linked = 0
    for init in model.graph.initializer:
        entry = table.get(prefix + init.name)
        if entry is None:
            continue
        offset, length, dtype, shape = entry
        if init.data_location == onnx.TensorProto.EXTERNAL or dtype not in _ST_DTYPES:
            continue
        stored = np.frombuffer(weights, _ST_DTYPES[dtype], count=length // np.dtype(_ST_DTYPES[dtype]).itemsize,
                               offset=offset).reshape(shape)  # fmt: skip
        mine = numpy_helper.to_array(init)
        if mine.dtype != stored.dtype or mine.shape != stored.shape or not np.array_equal(mine, stored):
            continue
        init.ClearField("raw_data")
        for f in ("float_data", "int64_data", "int32_data", "double_data"):
            init.ClearField(f)
        init.data_location = onnx.TensorProto.EXTERNAL
        del init.external_data[:]
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry_proto = init.external_data.add()
            entry_proto.key, entry_proto.value = key, value
        linked += 1
    return model.SerializeToString(), linked


def quantize_int8(net: TextEncoder) -> bytes:
    """int8 ONNX bytes of `net`: dynamic quantization of the MatMul weights, per output channel
    (signed int8), the rest float. Self-contained (no external data)."""
    import logging
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    folded = export_graph(net, fold_constants=True)
    logging.disable(logging.WARNING)  # the quantizer logs every tensor it skips (and advice) on the root logger
    try:
        with tempfile.TemporaryDirectory(prefix="jointpq-int8-") as tmp:  # its API takes paths
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(folded)
            quantize_dynamic(
                str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                extra_options={"MatMulConstBOnly": True},
            )  # fmt: skip
            return dst.read_bytes()
    except Exception as e:  # the quantizer raises many kinds; one error type for the callers
        raise ExportError(f"int8 quantization failed: {type(e).__name__}: {e}") from e
    finally:
        logging.disable(logging.NOTSET)


def onnx_files(
    encoder: TextEncoder, folder: str, weights: bytes, precision: str = "fp32"
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The ONNX files of `encoder` for its artifact folder (`weights`: the folder's
    model.safetensors bytes, which the graphs point at) and their description (onnx.json).
    The cosine to torch on `PROBE_TEXTS` is measured now and recorded; a float32 graph that
    does not reproduce torch (cosine < 0.9999) is an ExportError, never shipped."""
    from .onnx_runtime import FP32_MIN_COSINE, probe_cosine, session_from_bytes

    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r} is not one of {PRECISIONS}")
    graph, net = graph_of(encoder)
    prefix = "base." if graph == "base" else ""
    raw = export_graph(net)
    cosines = {"fp32": probe_cosine(net, session_from_bytes(raw))}
    if cosines["fp32"] < FP32_MIN_COSINE:
        raise ExportError(f"the float32 ONNX graph gives cosine {cosines['fp32']:.6f} to torch on the probe texts")
    fp32, linked = link_weights(raw, weights, "model.safetensors", prefix)
    files = {f"{folder}/{ONNX_FP32}": fp32}
    if precision == "int8":
        raw8 = quantize_int8(net)
        cosines["int8"] = probe_cosine(net, session_from_bytes(raw8))
        files[f"{folder}/{ONNX_INT8}"] = link_weights(raw8, weights, "model.safetensors", prefix)[0]
    import onnxruntime

    meta = {
        "graph": graph,
        "network": net.kind,
        "inputs": list(_module_and_names(net)[1]),
        "output": OUTPUT,
        "precision": precision,
        "files": {"fp32": ONNX_FP32} | ({"int8": ONNX_INT8} if precision == "int8" else {}),
        "weights": {"file": "model.safetensors", "linked_tensors": linked},
        "opset": OPSET,
        "exported_with": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "probe_min_cosine": {k: round(v, 6) for k, v in cosines.items()},
    }
    files[f"{folder}/{ONNX_META}"] = json.dumps(meta, indent=2).encode()
    return files, meta


def with_onnx(artifact: str | Path, out: str | Path, precision: str = "fp32") -> tuple[Path, dict[str, Any]]:
    """`jointpq onnx`: a new version of `artifact` whose encoder folders carry ONNX forms at
    `precision` (the query tower; an item tower of its own gets float32). Index, ids, canaries,
    weights and every other file are copied unchanged; the manifest records `onnx` (parent,
    precision, probe cosines) and `encoder_precision`. Returns (out, that record)."""
    from index import read_artifact, write_artifact
    from index.artifact import IDS, MANIFEST, TENSORS

    from .encoders import ENCODER_DIR, load_encoder
    from .towers import ITEM_DIR, TOWER

    artifact, out = Path(artifact), Path(out)
    manifest, index = read_artifact(artifact)
    if not (artifact / ENCODER_DIR / "encoder.json").is_file():
        raise ExportError(f"{artifact}: holds no query encoder to export (a vectors-only artifact)")
    folders = [ENCODER_DIR]
    tower = json.loads((artifact / TOWER).read_text()) if (artifact / TOWER).is_file() else {}
    if isinstance(tower, dict) and tower.get("tower") == "own":
        folders.append(ITEM_DIR)
    derived = {f"{f}/{n}" for f in folders for n in (ONNX_FP32, ONNX_INT8, ONNX_META)}
    extra: dict[str, Any] = {
        name: artifact / name for name in manifest.files if name not in {MANIFEST, TENSORS, IDS} | derived
    }
    metas = {}
    for folder in folders:
        encoder = load_encoder(artifact, folder)
        weights = (artifact / folder / "model.safetensors").read_bytes()
        files, metas[folder] = onnx_files(encoder, folder, weights, precision if folder == ENCODER_DIR else "fp32")
        extra.update(files)
    record = {
        "parent": manifest.version,
        "precision": precision,
        "probe_min_cosine": {f: m["probe_min_cosine"] for f, m in metas.items()},
    }
    training = dict(manifest.training) | {"onnx": record, "encoder_precision": precision}
    write_artifact(out, index, training=training, extra_files=extra)
    return out, record
