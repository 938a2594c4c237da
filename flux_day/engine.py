"""`Engine`: owns everything loaded and turns a checked request into images.

Build order is the invariant: plan, host memory, fuser, residency (tells the fuser when a visitor's
GPU copy, LoRAs and all, is dropped), LoRA manager; fp8 copies join the residency when first built.
Home copies and the master are never written: fused weights come from pristine copies.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from flux_day.cancel import stop_if_cancelled
from flux_day.compile import CompiledTransformers, compile_backend, encode_prompt, seed_sizes
from flux_day.config import Settings
from flux_day.errors import CapacityError, InputError, WeightsError
from flux_day.fp8 import Fp8Cache, Recipe, fp8_transformer
from flux_day.generation import Generation, PreparedRequest, call_arguments, timed
from flux_day.loras.fuse import WeightFuser
from flux_day.loras.manager import LoraManager
from flux_day.loras.refs import LoraRequest
from flux_day.memory_plan import GpuBudget, MemoryPlan, format_plan, plan_memory
from flux_day.models import CLIP, MODELS, SAFETY, T5, VAE, transformer_component
from flux_day.pipelines import (
    FluxModels,
    build_pipelines,
    component_sizes,
    load_models,
    pick_device,
    planned_modules,
)
from flux_day.request import GenerationRequest
from flux_day.residency import PinnedArena, Residency
from flux_day.safety import SafetyFilter
from flux_day.weights.download import ensure_weights

log = logging.getLogger(__name__)


class Engine:
    """dev and schnell in every mode, loaded once. `models`/`safety` inject in-memory components, `budget`
    plans for another GPU, `recipe` replaces the device's (tests run the CUDA recipe on the CPU)."""

    def __init__(
        self,
        settings: Settings,
        default_lora: str | None = None,
        models: FluxModels | None = None,
        safety: SafetyFilter | None = None,
        budget: GpuBudget | None = None,
        progress: Callable[[str], None] = log.info,
        recipe: Recipe | None = None,
    ) -> None:
        self.settings, self.device = settings, pick_device(settings.device)
        self.recipe = recipe or Recipe.for_device(self.device)
        self.dtype = self.recipe.dtype
        if models is None:
            ensure_weights(settings)  # fetches what is missing, unless FLUX_DAY_OFFLINE=1 (then it explains)
            models = load_models(Path(settings.weights), self.dtype)  # into CPU RAM; the plan moves them
        self.models = models
        self.safety = safety or SafetyFilter(Path(settings.weights), torch.device("cpu"), self.dtype)
        self.plan = self._plan(budget)
        host = PinnedArena(pin=self.device.type == "cuda")
        fuser = WeightFuser(self.plan, host, self.recipe.quantize)
        modules = planned_modules(models, self.safety)
        self.residency = Residency(modules, self.plan, self.device, host, on_leave=fuser.forget)
        self.loras = LoraManager(settings, fuser)
        self.fp8_cache = Fp8Cache(settings.fp8_cache)
        self.pipelines = {  # by transformer component
            transformer_component(model, fp8=False): build_pipelines(models, model, transformer)
            for model, transformer in models.transformers.items()
        }
        self.default_lora = default_lora or None  # requests add it: `GenerationRequest.with_default_lora`
        self.steps_done = 0  # denoising steps of the current request so far
        self.compiled = self._compile(progress)
        if self.default_lora:  # read now: a broken default fails setup rather than every prediction
            try:
                default = LoraRequest.operator_default(self.default_lora, 1.0)
                self.loras.weights(default, "dev", self.lora_components("dev"))
            except InputError as error:
                raise WeightsError(str(error)) from None

    def _plan(self, budget: GpuBudget | None) -> MemoryPlan:
        """Decide what stays on the GPU (fp8 copies by the size they will have); log it as one table."""
        if budget is None and self.device.type == "cuda":
            budget = GpuBudget(torch.cuda.get_device_properties(self.device).total_memory)
        total, reserve = (budget.total_bytes, budget.reserve_bytes) if budget else (None, 0)
        plan = plan_memory(component_sizes(self.models, self.safety), total, reserve)
        log.info("memory plan:\n%s", format_plan(plan))
        return plan

    def _compile(self, progress: Callable[[str], None]) -> CompiledTransformers | None:
        """Compile the chosen transformers' blocks and run them at every warm-up size: no request compiles."""
        backend = compile_backend(self.settings.compile, self.device)
        if backend is None:
            return None
        compiled = CompiledTransformers(backend, seed_sizes(), self.settings.compile_cache)
        for name in self.settings.compile_models:
            if self.plan[name] == "cpu-only":
                progress(f"compile: {name} does not fit this GPU; not compiled")
                continue
            model, precision = name.rsplit("-", 1)
            started, text_tokens = time.perf_counter(), MODELS[model].max_sequence_length
            pipe = self.pipeline(model, "txt2img", precision == "fp8")
            compiled.install([pipe.transformer])
            self.residency.need([CLIP, T5])
            embeds = encode_prompt(pipe, "", self.device, text_tokens)
            self.residency.need([name])
            compiled.warm_up(pipe, embeds, text_tokens)
            took = time.perf_counter() - started
            progress(f"compile: {name}'s blocks warmed at {len(compiled.sizes)} sizes in {took:.1f}s")
        return compiled

    def pipeline(self, model: str, mode: str, fp8: bool) -> Any:
        """The pipeline for `model` in `mode`; go_fast's are built on first need around the fp8 copy."""
        name = transformer_component(model, fp8)
        if name not in self.pipelines:
            master, files = self.models.transformers[model], self.models.sources.get(model, ())

            def build(device: torch.device) -> nn.Module:
                pristine = self.loras.fuser.pristine
                return fp8_transformer(model, master, device, self.recipe, self.fp8_cache, files, pristine)

            self.pipelines[name] = build_pipelines(self.models, model, self.residency.add(name, build))
        return self.pipelines[name][mode]

    def lora_components(self, model: str) -> dict[str, nn.Module]:
        """The modules LoRA files name: this model's full-precision transformer and CLIP's encoder."""
        models = self.models
        return {"transformer": models.transformers[model], "text_encoder": models.shared["text_encoder"]}

    def generate(self, request: GenerationRequest) -> Generation:
        """Run `request`: its images in output order, and what it took (timings, counts)."""
        return self.run_prepared(self.prepare(request))

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Everything before the GPU (fit, LoRAs downloaded and parsed); touches no weight, so many
        requests' threads may prepare while one runs."""
        if self.plan[request.transformer] == "cpu-only":
            raise CapacityError(
                f"go_fast: {request.transformer} does not fit this GPU (see the memory plan in the setup "
                f"log); set go_fast={'false' if request.fp8 else 'true'}."
            )
        timings: dict[str, float] = {}
        with timed(timings, "loras"):
            loras = self.loras.prepare(request.model, self.lora_components(request.model), request.loras)
        return PreparedRequest(request, loras, timings)

    def run_prepared(self, prepared: PreparedRequest) -> Generation:
        """The GPU part, one request at a time (the caller's to keep). A failure or cancel (raised anywhere
        in this thread) restores every LoRA, so nothing of this request reaches the next."""
        request, timings = prepared.request, prepared.timings
        self.steps_done = 0
        try:
            images = self._run(prepared, timings)
        except BaseException as error:
            self.loras.release()
            log.info(  # no class name: these lines are the prediction's logs, which its sender reads
                "request %s after %d of %d denoising steps; every LoRA restored",
                "cancelled" if not isinstance(error, Exception) else "failed",
                self.steps_done,
                request.num_inference_steps * request.num_outputs,
            )
            raise
        return Generation.logged(request, images, timings)

    def _run(self, prepared: PreparedRequest, timings: dict[str, float]) -> list[Image.Image]:
        """The algorithm: LoRAs, prompt, denoising (one call per output, seeded `seed + i`), safety."""
        request = prepared.request
        if request.go_fast and not request.fp8:
            log.info("go_fast: aspect_ratio=custom runs in full precision, as the schema promises")
        pipe = self.pipeline(request.model, request.mode, request.fp8)
        fp8 = pipe.transformer if request.fp8 else None
        args = (request.model, self.lora_components(request.model), request.loras, request.fp8)
        # CLIP's LoRAs before the prompt is encoded, the transformer's once it is on the GPU.
        with timed(timings, "loras"):
            self.loras.activate(*args, ["text_encoder"], prepared.loras, fp8)
        self.residency.need([CLIP, T5])
        embeds = encode_prompt(pipe, request.prompt, self.device, MODELS[request.model].max_sequence_length)
        self.residency.need([VAE, request.transformer])
        with timed(timings, "loras"):
            self.loras.activate(*args, prepared=prepared.loras, fp8=fp8)
        with timed(timings, "generate"), torch.inference_mode():
            call = functools.partial(pipe, **embeds, callback_on_step_end=self._count_step)
            images = [call(**call_arguments(request, seed)).images[0] for seed in request.seeds]
        if not request.disable_safety_checker:
            with timed(timings, "safety"):
                self.residency.need([SAFETY])
                images = self.safety.filter(images)
        return images

    def _count_step(self, pipe: object, step: int, timestep: object, tensors: dict) -> dict:
        """diffusers' per-step hook: counts steps for the cancel log line, and stops a cancelled request."""
        self.steps_done += 1
        stop_if_cancelled()
        return tensors
