"""One source of truth for training hyperparameters.

Every mode (`model.modes`) declares a dataclass deriving from `CommonConfig`; each field carries
its default *and* a one-line why (`option(...)`), as nanoGPT's `GPTConfig` does. From these
fields come the `jointpq train` flags (`add_config_flags`), the validation (`validate`), the
encoder-dependent defaults (`resolve`: a field left at None takes its mode's value for the chosen
encoder) and the manifest's record (`to_dict`, the whole resolved config). Named presets
(`model.presets`) override fields by name; nothing else in the project sets a hyperparameter.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

ENCODERS = ("minilm", "minilm-head", "hashed")


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field (as its flag) and why."""


def option(default: Any, why: str, *, choices: tuple | None = None, flag: str | None = None) -> Any:
    """A config field: its default, why that default, allowed values, and its CLI flag."""
    return field(default=default, metadata={"why": why, "choices": choices, "flag": flag})


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.lower().replace("_", "-")


@dataclass
class CommonConfig:
    """Fields every mode has. Subclasses add theirs and set `mode`, `encoders` (the encoders the
    mode can work with) and `by_encoder` (defaults that depend on the encoder)."""

    mode: ClassVar[str] = ""
    encoders: ClassVar[tuple[str, ...]] = ENCODERS
    by_encoder: ClassVar[dict[str, dict[str, Any]]] = {}

    encoder: str = option(
        "minilm", "a pretrained encoder: an untrained one gives an index over noise", choices=ENCODERS
    )
    M: int = option(16, "PQ subspaces = bytes per item at 8 bits: the memory/quality dial", flag="--m")
    nlist: int = option(64, "coarse cells; ~sqrt(n) to 4 sqrt(n) items per cell is Faiss's advice")
    nbits: int = option(8, "bits per PQ code: 8 (256 codewords) is the standard; 4 for fast-scan", choices=(4, 8))
    metric: str = option(
        "ip", "MiniLM is trained for cosine = inner product of normalised vectors", choices=("ip", "l2")
    )
    epochs: int = option(10, "upper bound; the guard keeps the best epoch and stops after `patience` without gain")
    batch_size: int = option(64, "queries per step; in-batch items are the other queries' candidates")
    lr: float | None = option(None, "encoder learning rate; None: the mode's value for the encoder")
    seed: int = option(0, "seeds every random choice (splits, sampling, k-means, init)")
    device: str = option("auto", "cuda when present, else cpu")
    max_seconds: float | None = option(None, "stop training after this much time (None: no limit)")
    guard: bool = option(
        True,
        "hold queries aside, keep the best epoch, ship the two-step start if nothing beats it: few labels overfit",
    )
    val_fraction: float = option(0.15, "share of the training queries held aside for validation")
    val_min: int = option(20, "at least this many validation queries: fewer is noise, not a measurement")
    val_max: int = option(500, "at most this many: validation runs every epoch")
    patience: int = option(3, "epochs without a better validation score before stopping")
    kmeans_iters: int | None = option(
        None, "k-means iterations of the two-step start (None: Faiss's 10 coarse / 25 PQ)"
    )
    canary_margin: float = option(0.8, "a later reload must reach this share of the canary recall measured now")
    encoder_precision: str = option(
        "fp32",
        "the query tower's ONNX graph the service runs: int8 ~2x faster on CPU; its nDCG cost is in docs/benchmarks.md",
        choices=("fp32", "int8"),
    )

    def resolve(self) -> CommonConfig:
        """A copy with encoder-dependent Nones filled in, then validated."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in self.by_encoder.get(self.encoder, {}).items():
            if values.get(name) is None:
                values[name] = value
        out = type(self)(**values)
        out.validate()
        return out

    def validate(self) -> None:
        """ConfigError naming the flag for any value outside its field's range, or a combination
        of mode and encoder that cannot work."""
        for f in fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"{flag_of(f)} {value!r} is not one of {choices}")
        if self.encoder not in self.encoders:
            raise ConfigError(
                f"--mode {self.mode} cannot use --encoder {self.encoder}: {self.encoder_refusal()}"
                f" (it works with {', '.join(self.encoders)})"
            )
        positive = ("M", "nlist", "batch_size", "val_min", "val_max")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag_of(_field(self, name))} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0 or self.patience < 1:
            raise ConfigError("--epochs must be >= 0 and --patience >= 1")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if not 0 < self.canary_margin <= 1:
            raise ConfigError(f"--canary-margin must be in (0, 1], got {self.canary_margin}")

    def encoder_refusal(self) -> str:
        return "not supported"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, **dataclasses.asdict(self)}

    @property
    def val_nprobe(self) -> int:
        """Cells probed when validating: a quarter of the cells, as a service would run it."""
        return max(1, self.nlist // 4)


def _field(cfg: Any, name: str) -> dataclasses.Field:
    return next(f for f in fields(cfg) if f.name == name)


def _base_type(hint: Any) -> type:
    """int | None -> int; a plain type stays."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def add_config_flags(parser: argparse.ArgumentParser, classes: list[type[CommonConfig]]) -> None:
    """One flag per field of any mode's config (union, first declaration wins), default None =
    'not given', so the mode's own default applies; the help says which modes take it and why."""
    seen: dict[str, dict[str, Any]] = {}  # field -> {mode: its default there}
    spec: dict[str, tuple[dataclasses.Field, type]] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            seen.setdefault(f.name, {})[cls.mode] = f.default
            spec.setdefault(f.name, (f, _base_type(hints[f.name])))
    for name, (f, kind) in spec.items():
        defaults = seen[name]
        where = "" if len(defaults) == len(classes) else f" [{', '.join(defaults)}]"
        shown = {m: "by encoder" if d is None else d for m, d in defaults.items()}
        if len(set(map(str, shown.values()))) == 1:
            default_text = str(next(iter(shown.values())))
        else:
            default_text = ", ".join(f"{m} {d}" for m, d in shown.items())
        help_text = f"{f.metadata['why']} (default: {default_text}){where}"
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text.replace("%", "%%")}
        if kind is bool:
            parser.add_argument(flag_of(f), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag_of(f), type=kind, choices=f.metadata.get("choices"), **kwargs)


def given_values(args: argparse.Namespace, classes: list[type[CommonConfig]]) -> dict[str, Any]:
    """The config fields the user set on the command line (flags left out are None)."""
    names = {f.name for cls in classes for f in fields(cls)}
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def build_config(cls: type[CommonConfig], values: dict[str, Any], given: set[str] | None = None) -> CommonConfig:
    """`cls` from field values; a value for a field the mode lacks is refused by its flag name
    (only those in `given`, the user's own, are errors; preset values for other modes are dropped)."""
    own = {f.name: f for f in fields(cls)}
    unknown = [n for n in values if n not in own and (given is None or n in given)]
    if unknown:
        flags = ", ".join(sorted("--" + n.lower().replace("_", "-") for n in unknown))
        raise ConfigError(f"{flags} does not apply to --mode {cls.mode}")
    cfg = cls(**{n: v for n, v in values.items() if n in own})
    return cfg.resolve()
