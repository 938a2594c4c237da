"""The engine's fp8 transformers as tests inspect them: the module, and its linears' inner tensors."""

from __future__ import annotations

import torch
from torch import nn

from flux_day.engine import Engine
from flux_day.loras.fuse import inner_tensors


def fp8_model(engine: Engine, model: str = "dev") -> nn.Module:
    """The fp8 transformer of `model` (made on first use)."""
    return engine.pipeline(model, "txt2img", fp8=True).transformer


def fp8_state(engine: Engine, model: str = "dev") -> dict[str, dict[str, torch.Tensor]]:
    """Every linear of the fp8 transformer as its inner tensors (qdata, scale), copied."""
    return {
        name: {part: tensor.clone() for part, tensor in inner_tensors(module.weight).items()}
        for name, module in fp8_model(engine, model).named_modules()
        if isinstance(module, nn.Linear)
    }
