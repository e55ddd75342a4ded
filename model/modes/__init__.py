"""Training modes: one module each, registered here by name.

A mode is its config class (fields, defaults and why, validation) and a `train(data, cfg,
inputs, progress) -> TrainResult` function. Adding a mode = one new file + one line below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from ..config import CommonConfig, ConfigError
from . import distill, jpq, poeem
from .base import TrainInputs, TrainResult


@dataclass(frozen=True)
class Mode:
    name: str
    config: type[CommonConfig]
    train: Callable[..., TrainResult]
    summary: str


def _mode(module: ModuleType, config: type[CommonConfig]) -> Mode:
    return Mode(config.mode, config, module.train, (module.__doc__ or "").strip().split("\n")[0])


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        _mode(distill, distill.DistillConfig),
        _mode(jpq, jpq.JpqConfig),
        _mode(poeem, poeem.PoeemConfig),
    )
}


def get_mode(name: str) -> Mode:
    """The registered mode; ConfigError listing the valid ones otherwise."""
    try:
        return MODES[name]
    except KeyError:
        raise ConfigError(f"--mode {name!r} is not one of {', '.join(['auto', *MODES])}") from None


__all__ = ["MODES", "Mode", "TrainInputs", "TrainResult", "get_mode"]
