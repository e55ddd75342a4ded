"""Named presets: the only place where the demo, the benchmarks, the trainer image and the tests
choose hyperparameters. A preset overrides config fields by name; fields a mode does not have are
left out for that mode (e.g. `codebook_lr` means nothing to poeem). The user's own flags win."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import ConfigError


@dataclass(frozen=True)
class Preset:
    why: str
    values: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "demo": Preset(
        "the demo's 2,000 SciFact abstracts: 32 cells (~60 items each), 16 bytes per item", {"M": 16, "nlist": 32}
    ),
    "trainer-image": Preset("docker/train.sh on the shipped demo subset: as the demo", {"M": 16, "nlist": 32}),
    "scifact": Preset("bench/quality.py on SciFact (5,183 docs): 64 cells, the defaults otherwise", {"nlist": 64}),
    "smoke": Preset(
        "seconds-long runs for tests and a first look: tiny index, few epochs, small candidate lists",
        {
            "M": 8,
            "nlist": 16,
            "epochs": 2,
            "min_queries": 200,
            "top_k": 50,
            "random_items": 64,
            "val_min": 10,
            "warmup_steps": 5,
            "batch_size": 32,
        },
    ),
}


def preset_values(name: str | None) -> dict[str, Any]:
    if name is None:
        return {}
    try:
        return dict(PRESETS[name].values)
    except KeyError:
        raise ConfigError(f"--preset {name!r} is not one of {', '.join(PRESETS)}") from None
