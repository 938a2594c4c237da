"""Loading the FLUX.1 models (`model_specs.MODELS`) so they share every component they can.

dev and schnell differ only in the transformer and the scheduler; text encoders, tokenizers and VAE
are loaded once, from the folder that ships them, and shared as the same objects. img2img and
inpaint pipelines are built from the loaded components. (Not with diffusers' `from_pipe`: it casts
the shared modules to float32 in place unless told the dtype, which would silently turn a bf16 model
into fp32.)
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

from flux_day.components import CLIP, SAFETY, T5, VAE, transformer_component
from flux_day.errors import WeightsError
from flux_day.fast import fp8_bytes
from flux_day.memory_plan import module_bytes
from flux_day.model_specs import MODELS, SHARED_COMPONENTS, shared_spec
from flux_day.weights.layout import has_base_models

log = logging.getLogger(__name__)


MODE_PIPELINES: Final[dict[str, type[DiffusionPipeline]]] = {
    "img2img": FluxImg2ImgPipeline,
    "inpaint": FluxInpaintPipeline,
}


def pick_device(setting: str) -> torch.device:
    """`auto` takes CUDA when present, else the CPU."""
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise WeightsError("FLUX_DAY_DEVICE=cuda but no CUDA device is visible; use auto or cpu.")
        return torch.device("cuda")
    return torch.device("cpu")


WEIGHTED: Final = {
    "transformer": FluxTransformer2DModel,
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModel,
    "text_encoder_2": T5EncoderModel,
}


def _load_component(folder: Path, name: str, model_class: type, dtype: torch.dtype) -> torch.nn.Module:
    started = time.perf_counter()
    module = model_class.from_pretrained(folder / name, dtype=dtype)
    size = module_bytes(module)
    log.info("loaded %s/%s: %.2f GB in %.1fs", folder.name, name, size / 1e9, time.perf_counter() - started)
    return module


@dataclass
class LoadedModels:
    """Everything the engine runs, however it was made: read from a weights root (`load_models`), or
    built in memory (the GPU proof's random full-size FLUX). Every step after this is the same."""

    transformers: dict[str, FluxTransformer2DModel]  # by model name: "dev", "schnell"
    schedulers: dict[str, FlowMatchEulerDiscreteScheduler]
    shared: dict[str, Any]  # vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2
    sources: dict[str, list[Path]] = field(default_factory=dict)  # each transformer's weight files


def load_models(root: Path, dtype: torch.dtype) -> LoadedModels:
    """Load every model of `MODELS` from `root` into CPU RAM once, sharing all but the transformers."""
    if not has_base_models(root):
        raise WeightsError(
            f"No FLUX weights under {root} (it needs {', '.join(f'{s.folder}/' for s in MODELS.values())}). "
            "Set FLUX_DAY_WEIGHTS to a weights root, or write tiny test weights with "
            "`python scripts/make_tiny_weights.py DIR`."
        )
    started = time.perf_counter()
    folders = {name: root / spec.folder for name, spec in MODELS.items()}
    shared_folder = root / shared_spec().folder
    # One component at a time, so each gets a log line with its bytes and load time.
    loaded = {
        name: _load_component(shared_folder, name, model_class, dtype)
        for name, model_class in WEIGHTED.items()
        if name != "transformer"
    }
    # The pipeline adds the tokenizers; the transformer is each model's own.
    shared = FluxPipeline.from_pretrained(shared_folder, dtype=dtype, transformer=None, **loaded)
    models = LoadedModels(
        transformers={
            name: _load_component(folder, "transformer", FluxTransformer2DModel, dtype)
            for name, folder in folders.items()
        },
        schedulers={
            name: FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
            for name, folder in folders.items()
        },
        shared={key: value for key, value in shared.components.items() if key in SHARED_COMPONENTS},
        sources={
            name: sorted((folder / "transformer").glob("*.safetensors")) for name, folder in folders.items()
        },
    )
    log.info(
        "loaded %s from %s (%s) in %.1fs",
        " and ".join(MODELS),
        root,
        str(dtype).removeprefix("torch."),
        time.perf_counter() - started,
    )
    return models


def build_pipelines(
    models: LoadedModels, transformers: dict[str, torch.nn.Module] | None = None
) -> dict[str, dict[str, DiffusionPipeline]]:
    """{model: {mode: pipeline}} for txt2img, img2img and inpaint, every one sharing `models`'
    modules; `transformers` replaces the transformer of some models (go_fast's fp8 copies)."""
    pipelines = {}
    for name, transformer in models.transformers.items():
        chosen = (transformers or {}).get(name, transformer)
        base = FluxPipeline(**models.shared, transformer=chosen, scheduler=models.schedulers[name])
        by_mode: dict[str, DiffusionPipeline] = {"txt2img": base}
        for mode, pipeline_class in MODE_PIPELINES.items():
            by_mode[mode] = pipeline_class(**base.components)
        pipelines[name] = by_mode
    return pipelines


def component_sizes(models: LoadedModels, safety: torch.nn.Module) -> dict[str, int]:
    """Bytes of every component the memory plan places, by its name: the shared ones, each model's
    transformer, and its fp8 copy by the size it will have (made on first use, sized before)."""
    shared = models.shared
    sizes = {
        CLIP: module_bytes(shared["text_encoder"]),
        T5: module_bytes(shared["text_encoder_2"]),
        VAE: module_bytes(shared["vae"]),
        SAFETY: module_bytes(safety),
    }
    for model, transformer in models.transformers.items():
        sizes[transformer_component(model, fp8=False)] = module_bytes(transformer)
        sizes[transformer_component(model, fp8=True)] = fp8_bytes(transformer)
    return sizes
