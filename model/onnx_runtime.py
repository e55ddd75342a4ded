"""A tower's network on ONNX Runtime, checked against torch before it serves, torch the fallback.

`attach(encoder, folder, runtime)` gives a loaded encoder an `OnnxRunner` built from the
artifact folder's ONNX graph (`model.onnx_export`); from then on `encoder.encode` runs the network
on ONNX Runtime (tokenization and a head's residual matmul stay in Python/torch). Before it is
attached the runner must reproduce torch on the probe texts: cosine >= 0.9999 for the float32
graph; for int8, at least what the export measured on the same texts, less a small tolerance (a
wrong or swapped graph falls far below; int8's effect on retrieval is the canary gate's to judge).
Whatever goes wrong (onnxruntime not installed, no graph, a graph that fails the check) leaves the
torch encoder in place and says why, in a log line and in the returned record, unless the caller
asked for `runtime="onnx"` explicitly (then it is an error).

`runtime="auto"` picks, per network and device, what measures faster here (`bench/encoder.py`):
ONNX Runtime for MiniLM on the CPU; torch for the hashed n-gram encoder (its cost is Python
tokenization: ONNX Runtime measured no faster) and on CUDA, unless onnxruntime-gpu is installed,
in which case both are timed on the probe texts at load and the faster one kept.

A runner also guards against its weights going stale: it remembers the torch parameters'
version counters and steps aside (torch again, with a log line) once an optimizer has changed
them, so a trainer that fine-tunes an accelerated encoder never encodes with old weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .encoders import TextEncoder
from .onnx_export import ONNX_FP32, ONNX_INT8, ONNX_META, PROBE_TEXTS, graph_of, onnx_inputs

log = logging.getLogger("jointpq.encoder")

RUNTIMES = ("auto", "torch", "onnx")
FP32_MIN_COSINE = 0.9999
INT8_COSINE_SLACK = 0.005  # below the export's own probe cosine by more: not the graph that was exported


class RuntimeUnavailableError(ValueError):
    """`runtime="onnx"` was asked for and cannot be had (message says why)."""


def ort_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _providers(device: torch.device | str) -> list[Any]:
    import onnxruntime as ort

    dev = torch.device(device)
    if dev.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _options(threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # no busy-waiting between calls: in the service the event loop and the tokenizer need those
    # cores (spinning measured slower under HTTP load on 2 cores)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def session_from_bytes(data: bytes, threads: int | None = None, device: torch.device | str = "cpu"):
    """A session over a self-contained graph held in memory (export time, `accelerate`)."""
    import onnxruntime as ort

    return ort.InferenceSession(data, _options(threads), providers=_providers(device))


def session_from_file(path: Path, threads: int | None = None, device: torch.device | str = "cpu"):
    """A session over a graph file; its external data (model.safetensors) is read from beside it."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), _options(threads), providers=_providers(device))


def _param_version(params: list[torch.Tensor]) -> int:
    return sum(p._version for p in params)


@dataclass(eq=False)
class OnnxRunner:
    """One session for one network (`net`: the encoder itself, or a head encoder's base)."""

    session: Any
    net: TextEncoder
    precision: str
    source: str  # the file (or "memory") the graph came from
    version: int = field(default=0)

    def __post_init__(self) -> None:
        self._params = list(self.net.parameters())  # listed once: walking the modules costs ~1 ms a call
        self.version = _param_version(self._params)
        self.output = self.session.get_outputs()[0].name

    def stale(self) -> bool:
        """The torch weights changed since this graph was made from them."""
        return _param_version(self._params) != self.version

    def run(self, texts: Sequence[str]) -> np.ndarray:
        """(n,) texts -> (n, d) float32: the network's output (a head's base embeddings)."""
        return self.session.run([self.output], onnx_inputs(self.net, texts))[0]

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())


def probe_cosine(net: TextEncoder, session: Any, texts: Sequence[str] = PROBE_TEXTS) -> float:
    """Smallest cosine between torch's and the session's embeddings of `texts` (net in eval mode)."""
    with torch.inference_mode():
        was = net.training
        net.eval()
        try:
            ref = net.embed(list(texts)).float().cpu().numpy()
        finally:
            net.train(was)
    out = session.run(None, onnx_inputs(net, list(texts)))[0]
    cos = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)).clip(1e-12)
    return float(cos.min())


class ExternalDataError(ValueError):
    """A graph's external data reaches outside its folder or past the end of its file."""


def confine_external_data(path: Path) -> None:
    """Every external tensor of the graph at `path` must live in a plain file beside it, within
    that file's size: a graph (checksummed, yet crafted) can never make ONNX Runtime read a file
    outside the artifact, or past the end of one. The graph's structure is read without its data."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        location = info.get("location", "")
        target = path.parent / location
        plain = bool(location) and Path(location).name == location and location not in (".", "..")
        if not plain or not target.is_file() or target.resolve().parent != path.parent.resolve():
            raise ExternalDataError(
                f"{path.name}: tensor {init.name!r} points at {location[:80]!r}, not a file beside it"
            )
        try:
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
        except ValueError:
            raise ExternalDataError(f"{path.name}: tensor {init.name!r} has a malformed offset or length") from None
        if end > target.stat().st_size:
            raise ExternalDataError(f"{path.name}: tensor {init.name!r} reads past the end of {location}")


def _same_network(a: TextEncoder, b: TextEncoder) -> bool:
    """Two encoder objects over the same modules (a copy.copy view shares them)."""
    if a is b:
        return True
    pa, pb = next(a.parameters(), None), next(b.parameters(), None)
    return pa is not None and pb is not None and pa.data_ptr() == pb.data_ptr() and type(a) is type(b)


def _time(fn, rounds: int = 3) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - t0) / rounds


def _refuse(encoder: TextEncoder, requested: str, reason: str, precision: str) -> dict[str, Any]:
    if requested == "onnx":
        raise RuntimeUnavailableError(reason)
    if requested == "auto" and reason.startswith("auto:"):
        log.info("encoder runs on torch (%s)", reason)
    else:
        log.warning("encoder falls back to torch: %s", reason)
    encoder.runtime = None
    return {"runtime": "torch", "precision": "fp32", "requested": requested, "artifact_precision": precision,
            "reason": reason}  # fmt: skip


def attach(
    encoder: TextEncoder,
    folder: str | Path,
    runtime: str = "auto",
    device: torch.device | str = "cpu",
    threads: int | None = None,
    precision: str | None = None,
    reuse: OnnxRunner | None = None,
) -> dict[str, Any]:
    """Run `encoder` on the ONNX graph in `folder` (an artifact's encoder/ or item_encoder/,
    already checksum-verified) when `runtime` and the checks allow. `precision`: the graph to
    use (default: the one onnx.json says the artifact serves; item towers pass "fp32").
    `reuse`: a runner over the same graph already loaded (the query tower's). Returns what was
    decided, for /info and the reload checks."""
    if runtime not in RUNTIMES:
        raise ValueError(f"encoder runtime {runtime!r} is not one of {RUNTIMES}")
    folder = Path(folder)
    meta_path = folder / ONNX_META
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        from index.artifact import read_json

        loaded = read_json(meta_path, f"{folder.name}/{ONNX_META}")
        meta = loaded if isinstance(loaded, dict) else {}
    want = precision or meta.get("precision") or "fp32"
    if runtime == "torch":
        encoder.runtime = None
        return {"runtime": "torch", "precision": "fp32", "requested": runtime, "artifact_precision": want}
    return {"threads": threads} | _attach(encoder, folder, meta, want, runtime, torch.device(device), threads, reuse)


def _attach(
    encoder: TextEncoder,
    folder: Path,
    meta: dict[str, Any],
    want: str,
    runtime: str,
    dev: torch.device,
    threads: int | None,
    reuse: OnnxRunner | None,
) -> dict[str, Any]:
    if not ort_available():
        return _refuse(encoder, runtime, "onnxruntime is not installed", want)
    _, net = graph_of(encoder)
    files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    name = files.get(want)
    if not meta or name not in (ONNX_FP32, ONNX_INT8) or not (folder / name).is_file():
        why = "made before ONNX forms: `jointpq onnx` adds them" if not meta else f"exported at {meta.get('precision')}"
        return _refuse(encoder, runtime, f"{folder.name}/ holds no {want} ONNX graph ({why})", want)
    if meta.get("network") != net.kind or meta.get("graph") not in ("whole", "base"):
        return _refuse(encoder, runtime, f"{folder.name}/{ONNX_META} describes a {meta.get('network')!r} network,"
                       f" the tower runs a {net.kind!r}", want)  # fmt: skip
    if runtime == "auto" and dev.type == "cpu" and net.kind == "hashed":
        return _refuse(encoder, runtime, "auto: the hashed encoder measures as fast on torch", want)
    if runtime == "auto" and dev.type == "cuda" and "CUDAExecutionProvider" not in _ort_providers():
        return _refuse(encoder, runtime, "auto: on CUDA without onnxruntime-gpu, torch", want)
    try:
        if reuse is not None and reuse.source == str(folder / name) and _same_network(reuse.net, net):
            session = reuse.session
        else:
            confine_external_data(folder / name)
            session = session_from_file(folder / name, threads, dev)
        cosine = probe_cosine(net, session)
    except Exception as e:  # a graph onnxruntime cannot load or run: torch serves
        return _refuse(encoder, runtime, f"{folder.name}/{name} does not run: {type(e).__name__}: {str(e)[:200]}", want)
    if want == "fp32":
        floor = FP32_MIN_COSINE
    else:
        recorded = (meta.get("probe_min_cosine") or {}).get("int8")
        floor = (float(recorded) if isinstance(recorded, int | float) else 0.95) - INT8_COSINE_SLACK
    if cosine < floor:
        return _refuse(encoder, runtime, f"{folder.name}/{name} disagrees with the torch weights (probe cosine"
                       f" {cosine:.6f} < {floor:.4f})", want)  # fmt: skip
    runner = OnnxRunner(session, net, want, str(folder / name))
    record = {
        "runtime": "onnx", "precision": want, "requested": runtime, "artifact_precision": meta.get("precision"),
        "graph": meta.get("graph"), "probe_min_cosine": round(cosine, 6), "providers": runner.providers,
    }  # fmt: skip
    if runtime == "auto" and dev.type == "cuda":  # both can run: keep the faster on the probe texts
        encoder.runtime = None
        t_torch = _time(lambda: encoder.encode(list(PROBE_TEXTS), batch_size=len(PROBE_TEXTS)))
        encoder.runtime = runner
        t_onnx = _time(lambda: encoder.encode(list(PROBE_TEXTS), batch_size=len(PROBE_TEXTS)))
        record["timed_ms"] = {"torch": round(t_torch * 1e3, 3), "onnx": round(t_onnx * 1e3, 3)}
        if t_torch <= t_onnx:
            encoder.runtime = None
            return record | {"runtime": "torch", "precision": "fp32", "reason": "auto: torch measured faster"}
    encoder.runtime = runner
    return record


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def accelerate(encoder: TextEncoder, threads: int | None = None, device: str = "auto") -> dict[str, Any]:
    """Make `encoder` encode at full speed for a corpus pass (no artifact needed): on a GPU it
    moves there (torch, or ONNX Runtime's CUDA provider when onnxruntime-gpu is installed); on a
    CPU it gets an in-memory float32 ONNX graph. Same checks and fallback as `attach`. What the
    demo and the benchmarks use to encode a corpus."""
    from index.search import resolve_device

    from .onnx_export import export_graph

    dev = resolve_device(device)
    if dev.type == "cuda":
        encoder.to(dev)
        if "CUDAExecutionProvider" not in (_ort_providers() if ort_available() else []):
            encoder.runtime = None
            return {"runtime": "torch", "precision": "fp32", "device": str(dev),
                    "reason": "auto: on CUDA without onnxruntime-gpu, torch"}  # fmt: skip
    if not ort_available():
        return _refuse(encoder, "auto", "onnxruntime is not installed", "fp32")
    graph, net = graph_of(encoder)
    try:
        session = session_from_bytes(export_graph(net), threads, dev)
        cosine = probe_cosine(net, session)
    except Exception as e:  # export, load or run: whatever fails, torch encodes
        return _refuse(encoder, "auto", f"{type(e).__name__}: {str(e)[:200]}", "fp32")
    if cosine < FP32_MIN_COSINE:
        return _refuse(encoder, "auto", f"the exported graph disagrees with torch (probe cosine {cosine:.6f})", "fp32")
    encoder.runtime = OnnxRunner(session, net, "fp32", "memory")
    return {"runtime": "onnx", "precision": "fp32", "graph": graph, "probe_min_cosine": round(cosine, 6),
            "device": str(dev)}  # fmt: skip


def describe(encoder: TextEncoder | None) -> dict[str, Any] | None:
    """What serves `encoder` now (for /info): the attach record, or torch."""
    if encoder is None:
        return None
    record = getattr(encoder, "runtime_info", None)
    return dict(record) if record else {"runtime": "onnx" if encoder.runtime is not None else "torch"}
