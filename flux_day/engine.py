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
from flux_day.fast import Fp8Transformers, compile_backend, compile_transformers
from flux_day.loras.manager import DEFAULT_LORA_INPUT, LoraManager, LoraRequest
from flux_day.loras.refs import parse_ref
from flux_day.memory_plan import format_plan, module_bytes, plan_memory
from flux_day.models import MODELS, load_pipelines, pick_device
from flux_day.request import GenerationRequest
from flux_day.residency import Residency
from flux_day.safety import SafetyFilter
from flux_day.weights.download import ensure_weights

log = logging.getLogger(__name__)


class Engine:
    """dev and schnell, each in txt2img, img2img and inpaint, loaded once and shared."""

    def __init__(self, settings: Settings, default_lora: str | None = None) -> None:
        self.settings = settings
        self.device, self.dtype = pick_device(settings.device)
        ensure_weights(settings)  # fetches what is missing, unless FLUX_DAY_OFFLINE=1 (then it explains)
        # On CUDA everything is loaded into CPU RAM first, and the memory plan decides what moves.
        load_device = torch.device("cpu") if self.device.type == "cuda" else self.device
        self.pipelines = load_pipelines(Path(settings.weights), load_device, self.dtype)
        self.fast = Fp8Transformers(
            {model: by_mode["txt2img"].transformer for model, by_mode in self.pipelines.items()}, self.device
        )
        self.fast_pipelines = {
            model: {
                mode: type(pipe)(**{**pipe.components, "transformer": self.fast.models[model]})
                for mode, pipe in by_mode.items()
            }
            for model, by_mode in self.pipelines.items()
        }
        self.safety = SafetyFilter(Path(settings.weights), self.device, self.dtype)
        self.residency = self._plan_memory()
        backend = compile_backend(settings.compile, self.device)
        if backend is not None:
            masters = [by_mode["txt2img"].transformer for by_mode in self.pipelines.values()]
            compile_transformers([*masters, *self.fast.models.values()], backend)
        self.loras = LoraManager(settings)
        self.default_lora = default_lora or None
        self.steps_done = 0  # denoising steps of the current request so far
        if self.default_lora:
            # Read it now, so a broken default fails setup rather than every prediction.
            try:
                self.loras.weights(self._default_lora(1.0), "dev", self.lora_components("dev"))
            except InputError as error:
                raise WeightsError(str(error)) from None

    def _plan_memory(self) -> Residency:
        """Measure every component, decide what stays on the GPU (logged as one table), and place it."""
        modules: dict[str, torch.nn.Module] = {}
        for model, by_mode in self.pipelines.items():
            modules[f"{model}-bf16"] = by_mode["txt2img"].transformer
            modules[f"{model}-fp8"] = self.fast.models[model]
        shared = self.pipelines["dev"]["txt2img"]
        modules |= {"clip": shared.text_encoder, "t5": shared.text_encoder_2, "vae": shared.vae}
        modules["safety"] = self.safety
        total = (
            torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        )
        plan = plan_memory({name: module_bytes(module) for name, module in modules.items()}, total)
        log.info("memory plan:\n%s", format_plan(plan))
        return Residency(modules, plan, self.device)

    def generate(
        self, request: GenerationRequest, metrics: dict[str, float] | None = None
    ) -> list[Image.Image]:
        """Run `request` and return its images in output order; timings and counts go into `metrics`."""
        metrics = {} if metrics is None else metrics
        fp8 = request.go_fast and not request.custom_size
        if request.go_fast and not fp8:
            log.info("go_fast: aspect_ratio=custom runs in full precision, as the schema promises")
        transformer = f"{request.model}-{'fp8' if fp8 else 'bf16'}"
        if self.residency.plan[transformer] == "cpu-only":
            raise InputError(
                f"go_fast: {transformer} does not fit this GPU (see the memory plan in the setup log); "
                f"set go_fast={'false' if fp8 else 'true'}."
            )
        loras = self.lora_requests(request)
        self.steps_done = 0
        try:
            images = self._run(request, loras, fp8, transformer, metrics)
        except BaseException as error:
            # Failed or cancelled (cog raises CancelationException into this thread, anywhere):
            # whatever was fused goes, so nothing of this request reaches the next one.
            self.release_loras()
            log.info(
                "request %s after %d of %d denoising steps (%s); every LoRA restored",
                "cancelled" if not isinstance(error, Exception) else "failed",
                self.steps_done,
                request.num_inference_steps * request.num_outputs,
                type(error).__name__,
            )
            raise
        metrics |= {
            "images": len(images),
            "steps": request.num_inference_steps * request.num_outputs,
            "megapixels": round(request.width * request.height * len(images) / 1e6, 4),
        }
        log.info(
            "request mode=%s model=%s%s size=%dx%d steps=%d seed=%d images=%d/%d loras=%s timings=%s",
            request.mode,
            request.model,
            " fp8" if fp8 else "",
            request.width,
            request.height,
            request.num_inference_steps,
            request.seed,
            len(images),
            request.num_outputs,
            self._shown(loras),
            {
                key.removeprefix("timing."): round(value, 3)
                for key, value in metrics.items()
                if key.startswith("timing.")
            },
        )
        return images

    def _run(
        self,
        request: GenerationRequest,
        loras: list[LoraRequest],
        fp8: bool,
        transformer: str,
        metrics: dict[str, float],
    ) -> list[Image.Image]:
        """LoRAs, denoising, safety: the steps of `generate` that a failure or a cancel must undo."""
        started = time.perf_counter()
        self._activate_loras(request, loras, fp8)
        metrics["timing.loras"] = time.perf_counter() - started
        images = self._denoise(request, fp8, transformer)
        metrics["timing.generate"] = time.perf_counter() - started - metrics["timing.loras"]
        if not request.disable_safety_checker:
            checked = time.perf_counter()
            self.residency.need(["safety"])
            images = self.safety.filter(images)
            metrics["timing.safety"] = time.perf_counter() - checked
        return images

    def release_loras(self) -> None:
        """Restore every fused weight, full precision and fp8, to the base model's bytes."""
        self.loras.release()
        for model in self.fast.models:
            self.fast.sync(model, set(), ())

    @staticmethod
    def _shown(loras: list[LoraRequest]) -> list[str] | str:
        """LoRAs as a log may show them: no query strings, tokens or data URI bodies."""
        shown = [
            f"{lora.input_name}={parse_ref(lora.input_name, lora.source).shown}x{lora.scale:g}"
            for lora in loras
            if lora.input_name != DEFAULT_LORA_INPUT
        ]
        return shown or "none"

    def _activate_loras(self, request: GenerationRequest, loras: list[LoraRequest], fp8: bool) -> None:
        """Fuse the request's LoRAs into the full-precision weights and, for fp8, re-quantize what changed."""
        # Before the prompt is encoded: a LoRA may change the CLIP text encoder too.
        self.loras.activate(request.model, self.lora_components(request.model), loras, go_fast=fp8)
        if fp8:
            transformer_modules = {
                name.removeprefix("transformer.")
                for name in self.loras.fused_modules
                if name.startswith("transformer.")
            }
            self.fast.sync(request.model, transformer_modules, self.loras.fuser.active)

    def _denoise(self, request: GenerationRequest, fp8: bool, transformer: str) -> list[Image.Image]:
        """Encode the prompt once, then one pipeline call per output with its own seed."""
        pipe = (self.fast_pipelines if fp8 else self.pipelines)[request.model][request.mode]
        self.residency.need(["clip", "t5"])
        with torch.inference_mode():
            prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(
                prompt=request.prompt,
                prompt_2=None,
                device=self.device,
                max_sequence_length=MODELS[request.model].max_sequence_length,
            )
            self.residency.need(["vae", transformer])
            return [
                pipe(
                    **self._call_arguments(request, seed),
                    prompt_embeds=prompt_embeds,
                    pooled_prompt_embeds=pooled_prompt_embeds,
                    callback_on_step_end=self._count_step,
                ).images[0]
                for seed in request.seeds
            ]

    def _count_step(self, pipe: object, step: int, timestep: object, tensors: dict) -> dict:
        """diffusers' per-step hook: counts steps, so a cancel's log line says where it stopped."""
        self.steps_done += 1
        return tensors

    def lora_requests(self, request: GenerationRequest) -> list[LoraRequest]:
        """The LoRAs `request` asks for; the default LoRA stands in when replicate_weights is empty."""
        loras = [LoraRequest(c.input_name, c.source, c.scale) for c in request.loras]
        if self.default_lora and not any(c.input_name == "replicate_weights" for c in request.loras):
            loras.insert(0, self._default_lora(request.lora_scale))
        return loras

    def _default_lora(self, scale: float) -> LoraRequest:
        return LoraRequest(DEFAULT_LORA_INPUT, self.default_lora or "", scale)

    def lora_components(self, model: str) -> dict[str, torch.nn.Module]:
        """The modules LoRAs may change: this model's transformer and the shared CLIP text encoder."""
        pipe = self.pipelines[model]["txt2img"]
        return {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}

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
