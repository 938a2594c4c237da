"""Loading dev and schnell once, sharing every component they can, and building their pipelines.

Pipelines are built from the loaded components, not with diffusers' `from_pipe`, which casts the shared
modules to float32 in place unless told the dtype (a bf16 model would silently become fp32).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from transformers import CLIPTextModel, T5EncoderModel

from flux_day.errors import WeightsError
from flux_day.fp8 import fp8_bytes
from flux_day.models import (
    CLIP,
    MODELS,
    SAFETY,
    SHARED_COMPONENTS,
    T5,
    VAE,
    shared_spec,
    transformer_component,
)
from flux_day.residency import module_bytes
from flux_day.weights.manifest import has_base_models

log = logging.getLogger(__name__)

MODES: Final[dict[str, type[DiffusionPipeline]]] = {
    "txt2img": FluxPipeline,
    "img2img": FluxImg2ImgPipeline,
    "inpaint": FluxInpaintPipeline,
}
WEIGHTED: Final = {"vae": AutoencoderKL, "text_encoder": CLIPTextModel, "text_encoder_2": T5EncoderModel}


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise WeightsError("FLUX_DAY_DEVICE=cuda but no CUDA device is visible; use auto or cpu.")
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class FluxModels:
    """The modules dev and schnell run, loaded (`load_models`) or built in memory (the GPU proof)."""

    transformers: dict[str, FluxTransformer2DModel]  # by model name: "dev", "schnell"
    schedulers: dict[str, FlowMatchEulerDiscreteScheduler]
    shared: dict[str, Any]  # vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2
    sources: dict[str, list[Path]] = field(default_factory=dict)  # each transformer's weight files


def _load(folder: Path, name: str, model_class: type, dtype: torch.dtype) -> torch.nn.Module:
    started = time.perf_counter()
    module = model_class.from_pretrained(folder / name, dtype=dtype)
    took = time.perf_counter() - started
    log.info("loaded %s/%s: %.2f GB in %.1fs", folder.name, name, module_bytes(module) / 1e9, took)
    return module


def load_models(root: Path, dtype: torch.dtype) -> FluxModels:
    """Load every model of `MODELS` from `root` into CPU RAM once, sharing all but the transformers."""
    if not has_base_models(root):
        raise WeightsError(
            f"No FLUX weights under {root} (it needs {', '.join(f'{s.folder}/' for s in MODELS.values())}). "
            "Set FLUX_DAY_WEIGHTS to a weights root, or write tiny test weights with "
            "`python scripts/make_tiny_weights.py DIR`."
        )
    started = time.perf_counter()
    shared_folder = root / shared_spec().folder
    loaded = {name: _load(shared_folder, name, model_class, dtype) for name, model_class in WEIGHTED.items()}
    # The pipeline adds the tokenizers; the transformer is each model's own.
    shared = FluxPipeline.from_pretrained(shared_folder, dtype=dtype, transformer=None, **loaded)
    models = FluxModels(
        {}, {}, {key: value for key, value in shared.components.items() if key in SHARED_COMPONENTS}
    )
    for name, spec in MODELS.items():
        folder = root / spec.folder
        models.transformers[name] = _load(folder, "transformer", FluxTransformer2DModel, dtype)
        models.schedulers[name] = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
        models.sources[name] = sorted((folder / "transformer").glob("*.safetensors"))
    took = time.perf_counter() - started
    log.info("loaded %s from %s (%s) in %.1fs", " and ".join(MODELS), root, str(dtype)[6:], took)
    return models


def build_pipelines(
    models: FluxModels, model: str, transformer: torch.nn.Module
) -> dict[str, DiffusionPipeline]:
    """{mode: pipeline} of `model` around `transformer` (master or fp8 copy), sharing the other modules."""
    scheduler = models.schedulers[model]
    return {
        mode: cls(**models.shared, transformer=transformer, scheduler=scheduler)
        for mode, cls in MODES.items()
    }


def planned_modules(models: FluxModels, safety: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every module the memory plan places that exists at setup, by its name (fp8 copies come later)."""
    shared = models.shared
    modules = {CLIP: shared["text_encoder"], T5: shared["text_encoder_2"], VAE: shared["vae"], SAFETY: safety}
    return modules | {transformer_component(m, False): t for m, t in models.transformers.items()}


def component_sizes(models: FluxModels, safety: torch.nn.Module) -> dict[str, int]:
    """Bytes of every component the memory plan places; fp8 copies by the size they will have."""
    sizes = {name: module_bytes(module) for name, module in planned_modules(models, safety).items()}
    return sizes | {transformer_component(m, True): fp8_bytes(t) for m, t in models.transformers.items()}
