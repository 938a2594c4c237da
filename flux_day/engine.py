"""`Engine`: owns everything loaded and turns a checked request into images.

`generate` reads as the algorithm: read the request's LoRAs (`prepare`: no GPU, many requests at once),
then, one request at a time (`run_prepared`), bring what it runs on to the GPU, fuse its LoRAs (CLIP's
before the prompt is encoded, the transformer's once it is on the GPU), encode the prompt once, and run
one pipeline call per output seeded `seed + i` (each image is what a single-output request gives).

Offload, LoRAs and fp8 keep three invariants together. A home copy (`residency`) is never written: a
visitor's LoRAs leave with its GPU copy, and the fuser is told (`on_leave`). Every fused weight is
written from one pristine copy (the home copy when it has one) and restored by copying it back. An
fp8 layer holds quantize(master pristine + LoRA): neither the fuse nor the fp8 copy, built on first need
from the master's pristine values, writes the master. Hence the order below: plan, host memory,
fuser, residency (which tells the fuser), LoRA manager; fp8 copies join the residency when first built.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from flux_day.cancel import stop_if_cancelled
from flux_day.compile import CompiledTransformers, compile_backend, encode_nothing, seed_sizes
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
    """dev and schnell, each in txt2img, img2img and inpaint, loaded once and shared.

    `models` and `safety` inject components built in memory (the GPU proof); `budget` plans memory for
    another GPU than the one present; `recipe` replaces the device's dtype and fp8 recipe (tests run the
    CUDA recipe on the CPU).
    """

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
        self.pipelines = {  # by transformer component; go_fast's are added on first need
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
        """Measure every component (fp8 copies by the size they will have), decide what stays on the GPU,
        and log the plan as one table."""
        if budget is None and self.device.type == "cuda":
            budget = GpuBudget(torch.cuda.get_device_properties(self.device).total_memory)
        sizes = component_sizes(self.models, self.safety)
        plan = (
            plan_memory(sizes, budget.total_bytes, budget.reserve_bytes)
            if budget
            else plan_memory(sizes, None)
        )
        log.info("memory plan:\n%s", format_plan(plan))
        return plan

    def _compile(self, progress: Callable[[str], None]) -> CompiledTransformers | None:
        """With compilation on, the chosen transformers' repeated blocks compiled now and run at every
        warm-up size, so no request compiles."""
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
            embeds = encode_nothing(pipe, self.device, text_tokens)
            self.residency.need([name])
            compiled.warm_up(pipe, embeds, text_tokens)
            took = time.perf_counter() - started
            progress(f"compile: {name}'s blocks warmed at {len(compiled.sizes)} sizes in {took:.1f}s")
        return compiled

    def pipeline(self, model: str, mode: str, fp8: bool) -> Any:
        """The pipeline for `model` in `mode`; go_fast's are built on first need around the fp8 copy (read
        from the disk cache, or quantized from the master's pristine values), which joins the residency."""
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
        return {
            "transformer": self.models.transformers[model],
            "text_encoder": self.models.shared["text_encoder"],
        }

    def generate(self, request: GenerationRequest) -> Generation:
        """Run `request`: its images in output order, and what it took (timings, counts)."""
        return self.run_prepared(self.prepare(request))

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Everything of `request` before the GPU: whether it fits, its LoRAs downloaded and parsed.
        Touches no weight: many requests' threads may prepare while one runs (`run_prepared`)."""
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
        """The GPU part of a prepared request, one at a time (the caller's to keep). A failure or a cancel
        (cog raises CancelationException into this thread, anywhere; `flux_day.cancel` at each step)
        restores every LoRA, so nothing of this request reaches the next one."""
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
        """The algorithm: LoRAs, prompt, denoising, safety."""
        request, loras = prepared.request, prepared.loras
        if request.go_fast and not request.fp8:
            log.info("go_fast: aspect_ratio=custom runs in full precision, as the schema promises")
        pipe = self.pipeline(request.model, request.mode, request.fp8)
        components = self.lora_components(request.model)
        fp8 = pipe.transformer if request.fp8 else None
        # CLIP's part is fused before the prompt is encoded, the transformer's once it is on the GPU
        # (T5 may share its slot on small cards).
        with timed(timings, "loras"):
            self.loras.activate(
                request.model, components, request.loras, request.fp8, ["text_encoder"], loras, fp8
            )
        self.residency.need([CLIP, T5])
        with torch.inference_mode():
            text_tokens = MODELS[request.model].max_sequence_length
            embeds, pooled, _ = pipe.encode_prompt(
                request.prompt, None, self.device, max_sequence_length=text_tokens
            )
        self.residency.need([VAE, request.transformer])
        with timed(timings, "loras"):
            self.loras.activate(
                request.model, components, request.loras, request.fp8, prepared=loras, fp8=fp8
            )
        with timed(timings, "generate"), torch.inference_mode():
            images = [  # one call per output, with its own seed, on the prompt encoded once
                pipe(
                    **call_arguments(request, seed),
                    prompt_embeds=embeds,
                    pooled_prompt_embeds=pooled,
                    callback_on_step_end=self._count_step,
                ).images[0]
                for seed in request.seeds
            ]
        if not request.disable_safety_checker:
            with timed(timings, "safety"):
                self.residency.need([SAFETY])
                images = self.safety.filter(images)
        return images

    def _count_step(self, pipe: object, step: int, timestep: object, tensors: dict) -> dict:
        """diffusers' per-step hook: counts steps (a cancel's log line says where it stopped) and stops a
        cancelled request (an async cancel does not reach this thread by itself)."""
        self.steps_done += 1
        stop_if_cancelled()
        return tensors
