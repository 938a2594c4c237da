"""Engines for tests: the tiny weights on the CPU, with a few settings changed by their environment names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flux_day.config import Settings
from flux_day.engine import Card, Engine

EngineFactory = Callable[..., Engine]


def cpu_engine(
    weights: Path, *, card: Card | None = None, default_lora: str | None = None, **settings: str
) -> Engine:
    """A new Engine on `weights` on the CPU; `settings` (`FLUX_DAY_X="..."`) go over the defaults."""
    env = {"FLUX_DAY_WEIGHTS": str(weights), "FLUX_DAY_DEVICE": "cpu", **settings}
    return Engine(Settings.from_env(env), default_lora=default_lora, card=card)
