"""The names of what the engine loads: one vocabulary for the engine, plan, settings and benchmarks.

The memory plan and its simulator, the settings (`FLUX_DAY_COMPILE_MODELS`) and the benchmarks all
name components this way.

A transformer is named for its model and precision: `dev-full` is dev as loaded (bf16 on a GPU,
float32 on a CPU, so not "bf16"), `dev-fp8` its go_fast copy. The shared components have one name each.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from flux_day.model_specs import MODELS


class Shared(StrEnum):
    """Components every request uses, whatever its model (a `str`, so they key plans and logs as is)."""

    CLIP = "clip"
    T5 = "t5"
    VAE = "vae"
    SAFETY = "safety"  # the CompVis checker and the Falconsai classifier, placed together


def transformer_component(model: str, fp8: bool) -> str:
    """The name of `model`'s transformer in full precision (`dev-full`) or fp8 (`dev-fp8`)."""
    return f"{model}-{'fp8' if fp8 else 'full'}"


TRANSFORMERS: Final = tuple(transformer_component(model, fp8) for model in MODELS for fp8 in (False, True))
CLIP, T5, VAE, SAFETY = Shared.CLIP, Shared.T5, Shared.VAE, Shared.SAFETY
