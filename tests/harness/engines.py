"""Engines for tests: the tiny weights on the CPU, with a few settings changed by their environment names,
in either fp8 recipe: the CPU's own (float32, weight-only fp8) or the CUDA one (`PRODUCTION`: bf16,
dynamic fp8 activations through `torch._scaled_mm`, which torch runs on the CPU too)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import pytest
import torchao.quantization.quant_api as torchao_quant_api

from flux_day.config import Settings
from flux_day.engine import Engine
from flux_day.fp8 import PRODUCTION, WEIGHT_ONLY, Recipe
from flux_day.memory_plan import GpuBudget

EngineFactory = Callable[..., Engine]

# Test ids: every go_fast test runs under both (`pytest -k production` runs the CUDA recipe alone).
RECIPES: Final[dict[str, Recipe]] = {"weight-only": WEIGHT_ONLY, "production": PRODUCTION}


@contextmanager
def cuda_recipe_on_cpu() -> Iterator[None]:
    """Lift torchao's hardware assertion (`_check_hardware_support`: an sm89+ GPU or XPU for per-row
    fp8), the only thing that stops the production recipe on a CPU. Tests only: a server must not."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torchao_quant_api, "_check_hardware_support", lambda granularity: None)
        yield


def cpu_engine(
    weights: Path,
    *,
    budget: GpuBudget | None = None,
    default_lora: str | None = None,
    recipe: str = "weight-only",
    **settings: str,
) -> Engine:
    """A new Engine on `weights` on the CPU in `recipe` (a key of `RECIPES`); `settings`
    (`FLUX_DAY_X="..."`) go over the defaults."""
    env = {"FLUX_DAY_WEIGHTS": str(weights), "FLUX_DAY_DEVICE": "cpu", **settings}
    return Engine(Settings.from_env(env), default_lora=default_lora, budget=budget, recipe=RECIPES[recipe])
