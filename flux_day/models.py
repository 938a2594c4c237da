"""The two FLUX.1 models as data, and loading them so they share every component they can.

dev and schnell differ only in the transformer and the scheduler; text encoders, tokenizers and VAE
are loaded once and shared as the same objects. img2img and inpaint pipelines are built from the
loaded components. (Not with diffusers' `from_pipe`: it casts the shared modules to float32 in place
unless told the dtype, which would silently turn a bf16 model into fp32.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

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
from flux_day.memory_plan import module_bytes
from flux_day.weights.layout import DEV_FOLDER, SCHNELL_FOLDER, has_base_models

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What distinguishes one FLUX.1 variant."""

    name: str
    folder: str
    repo_id: str
    max_sequence_length: int  # T5 tokens the model was trained with
    guidance_embeds: bool  # dev is guidance-distilled; schnell takes no guidance


MODELS: Final[dict[str, ModelSpec]] = {
    "dev": ModelSpec("dev", DEV_FOLDER, "black-forest-labs/FLUX.1-dev", 512, True),
    "schnell": ModelSpec("schnell", SCHNELL_FOLDER, "black-forest-labs/FLUX.1-schnell", 256, False),
}

MODE_PIPELINES: Final[dict[str, type[DiffusionPipeline]]] = {
    "img2img": FluxImg2ImgPipeline,
    "inpaint": FluxInpaintPipeline,
}


def pick_device(setting: str) -> tuple[torch.device, torch.dtype]:
    """`auto` takes CUDA with bf16 when present, else the CPU in float32 (bf16 is slow there)."""
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise WeightsError("FLUX_DAY_DEVICE=cuda but no CUDA device is visible; use auto or cpu.")
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


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


def load_pipelines(
    root: Path, device: torch.device, dtype: torch.dtype
) -> dict[str, dict[str, DiffusionPipeline]]:
    """Load dev and schnell from `root` once; return {model: {mode: pipeline}} sharing weights."""
    if not has_base_models(root):
        raise WeightsError(
            f"No FLUX weights under {root} (it needs {DEV_FOLDER}/ and {SCHNELL_FOLDER}/). "
            "Set FLUX_DAY_WEIGHTS to a weights root, or write tiny test weights with "
            "`python scripts/make_tiny_weights.py DIR`."
        )
    started = time.perf_counter()
    dev_dir, schnell_dir = root / DEV_FOLDER, root / SCHNELL_FOLDER
    # One component at a time, so each gets a log line with its bytes and load time.
    loaded = {
        name: _load_component(dev_dir, name, model_class, dtype) for name, model_class in WEIGHTED.items()
    }
    dev = FluxPipeline.from_pretrained(dev_dir, dtype=dtype, **loaded)  # adds tokenizers and scheduler
    schnell = FluxPipeline(
        **{
            **dev.components,
            "transformer": _load_component(schnell_dir, "transformer", FluxTransformer2DModel, dtype),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(schnell_dir / "scheduler"),
        }
    )
    pipelines = {}
    for name, base in (("dev", dev), ("schnell", schnell)):
        base.to(device)
        by_mode: dict[str, DiffusionPipeline] = {"txt2img": base}
        for mode, pipeline_class in MODE_PIPELINES.items():
            by_mode[mode] = pipeline_class(**base.components)
        pipelines[name] = by_mode
    log.info(
        "loaded dev and schnell from %s on %s (%s) in %.1fs",
        root,
        device,
        str(dtype).removeprefix("torch."),
        time.perf_counter() - started,
    )
    return pipelines
