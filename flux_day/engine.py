"""`Engine`: owns everything loaded and turns a checked request into images.

`generate` reads as the algorithm: pick the pipeline for model and mode, encode the prompt once,
then run one pipeline call per output with its own generator seeded `seed + i`, so each image is
exactly what a single-output request with that seed gives.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from PIL import Image

from flux_day.config import Settings
from flux_day.errors import InputError, WeightsError
from flux_day.models import MODELS, load_pipelines, pick_device
from flux_day.request import GenerationRequest

log = logging.getLogger(__name__)


class Engine:
    """dev and schnell, each in txt2img, img2img and inpaint, loaded once and shared."""

    def __init__(self, settings: Settings, default_lora: str | None = None) -> None:
        if default_lora:
            raise WeightsError(
                "A default LoRA (COG_WEIGHTS or setup(weights=...)) was given, but this build "
                "cannot load LoRAs yet; unset COG_WEIGHTS."
            )
        self.settings = settings
        self.device, self.dtype = pick_device(settings.device)
        self.pipelines = load_pipelines(Path(settings.weights), self.device, self.dtype)

    def generate(self, request: GenerationRequest) -> list[Image.Image]:
        """Run `request` and return its images in output order."""
        if request.loras:
            first = request.loras[0]
            raise InputError(
                f"{first.input_name}: LoRAs cannot be loaded by this build yet; leave "
                "replicate_weights and extra_lora empty."
            )
        if request.go_fast:
            log.info("go_fast: the fp8 transformer is not available yet; running full precision")
        spec = MODELS[request.model]
        pipe = self.pipelines[request.model][request.mode]
        started = time.perf_counter()
        with torch.inference_mode():
            prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(
                prompt=request.prompt,
                prompt_2=None,
                device=self.device,
                max_sequence_length=spec.max_sequence_length,
            )
            images = [
                pipe(
                    **self._call_arguments(request, seed),
                    prompt_embeds=prompt_embeds,
                    pooled_prompt_embeds=pooled_prompt_embeds,
                ).images[0]
                for seed in request.seeds
            ]
        log.info(
            "generated mode=%s model=%s size=%dx%d steps=%d outputs=%d seed=%d in %.2fs",
            request.mode,
            request.model,
            request.width,
            request.height,
            request.num_inference_steps,
            request.num_outputs,
            request.seed,
            time.perf_counter() - started,
        )
        return images

    @staticmethod
    def _call_arguments(request: GenerationRequest, seed: int) -> dict[str, object]:
        """The diffusers call for one output; a CPU generator makes seeds device-independent."""
        arguments: dict[str, object] = {
            "width": request.width,
            "height": request.height,
            "num_inference_steps": request.num_inference_steps,
            "guidance_scale": request.guidance_scale,
            "generator": torch.Generator("cpu").manual_seed(seed),
            "max_sequence_length": MODELS[request.model].max_sequence_length,
        }
        if request.image is not None:
            arguments.update(image=request.image, strength=request.prompt_strength)
        if request.mask is not None:
            arguments["mask_image"] = request.mask
        return arguments
