"""`Engine`: owns everything loaded and turns a checked request into images.

`generate` reads as the algorithm: read the request's LoRAs (`prepare`: no GPU, many requests at
once), then, one request at a time (`run_prepared`), bring what it runs on to the GPU, fuse its LoRAs
into that (CLIP first, then the transformer), encode the prompt once, then run one pipeline call per
output with its own generator seeded `seed + i`, so each image is exactly what a single-output request
with that seed gives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from flux_day.cancel import stop_if_cancelled
from flux_day.compile import CompiledTransformers, compile_backend, encode_nothing, seed_sizes
from flux_day.components import CLIP, SAFETY, T5, VAE, transformer_component
from flux_day.config import Settings
from flux_day.errors import CapacityError, InputError, WeightsError
from flux_day.fast import Fp8Cache, Fp8Transformers, Recipe
from flux_day.generation import Generation, call_arguments, log_summary, timed
from flux_day.loras.formats import LoraWeights
from flux_day.loras.fuse import PristineStore
from flux_day.loras.manager import LoraManager, LoraTargets
from flux_day.loras.refs import LoraRequest
from flux_day.memory_plan import DEFAULT_RESERVE, MemoryPlan, format_plan, plan_memory
from flux_day.model_specs import MODELS
from flux_day.models import LoadedModels, build_pipelines, component_sizes, load_models, pick_device
from flux_day.request import GenerationRequest
from flux_day.residency import Residency
from flux_day.safety import SafetyFilter
from flux_day.weights.download import ensure_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Card:
    """A GPU to plan for: its total memory and the room kept for activations."""

    total_bytes: int
    reserve_bytes: int = DEFAULT_RESERVE


@dataclass
class PreparedRequest:
    """A request with everything it needs before the GPU: its LoRAs read (None for scale 0 ones), and
    the seconds that took (`timings`, which the GPU part adds to)."""

    request: GenerationRequest
    loras: list[LoraWeights | None]
    timings: dict[str, float] = field(default_factory=dict)


class Engine:
    """dev and schnell, each in txt2img, img2img and inpaint, loaded once and shared.

    `models` and `safety` inject components built in memory (the GPU proof); by default they are read
    from the weights root. Everything after loading is the same either way. `card` plans memory for
    another card than the one present (the GPU proof's 80 GB run; on a CPU, a plan that offloads).
    `recipe` replaces the device's dtype and fp8 recipe (tests run the CUDA recipe on the CPU).
    """

    def __init__(
        self,
        settings: Settings,
        default_lora: str | None = None,
        models: LoadedModels | None = None,
        safety: SafetyFilter | None = None,
        card: Card | None = None,
        progress: Callable[[str], None] = log.info,
        recipe: Recipe | None = None,
    ) -> None:
        self.settings = settings
        self.device = pick_device(settings.device)
        self.recipe = recipe or Recipe.for_device(self.device)
        self.dtype = self.recipe.dtype
        if models is None:
            ensure_weights(settings)  # fetches what is missing, unless FLUX_DAY_OFFLINE=1 (then it explains)
            # On CUDA everything is read into CPU RAM first, and the memory plan decides what moves.
            models = load_models(Path(settings.weights), self.dtype)
        self.models = models
        self.pipelines = build_pipelines(models)
        self._fp8_pipelines: dict[str, dict[str, object]] = {}
        self.fast = Fp8Transformers(
            models.transformers,
            self.device,
            self.recipe.fp8,
            Fp8Cache(settings.fp8_cache),
            models.sources,
        )
        self.safety = safety or SafetyFilter(Path(settings.weights), torch.device("cpu"), self.dtype)
        self.plan = self._plan(card)
        self.residency = Residency(
            self._modules(),
            self.plan,
            self.device,
            builders={
                transformer_component(model, fp8=True): self._fp8_builder(model)
                for model in models.transformers
            },
        )
        self.loras = LoraManager(settings, PristineStore(self.plan, self.residency.home, self.residency.host))
        self.residency.on_leave = self.loras.fuser.forget
        self.default_lora = default_lora or None  # requests add it: `GenerationRequest.with_default_lora`
        self.steps_done = 0  # denoising steps of the current request so far
        self.compiled = self._compile(progress)
        if self.default_lora:
            # Read it now, so a broken default fails setup rather than every prediction.
            try:
                default = LoraRequest.operator_default(self.default_lora, 1.0)
                self.loras.weights(default, "dev", self._targets("dev", fp8=False).components)
            except InputError as error:
                raise WeightsError(str(error)) from None

    def _modules(self) -> dict[str, nn.Module]:
        """Every planned module that exists at setup (fp8 copies are made on first use)."""
        modules: dict[str, nn.Module] = {
            transformer_component(model, fp8=False): transformer
            for model, transformer in self.models.transformers.items()
        }
        shared = self.models.shared
        return modules | {
            CLIP: shared["text_encoder"],
            T5: shared["text_encoder_2"],
            VAE: shared["vae"],
            SAFETY: self.safety,
        }

    def _plan(self, card: Card | None) -> MemoryPlan:
        """Measure every component (fp8 copies by the size they will have), decide what stays on the
        GPU, and log the plan as one table."""
        sizes = component_sizes(self.models, self.safety)
        if card is not None:
            plan = plan_memory(sizes, card.total_bytes, card.reserve_bytes)
        elif self.device.type == "cuda":
            plan = plan_memory(sizes, torch.cuda.get_device_properties(self.device).total_memory)
        else:
            plan = plan_memory(sizes, None)
        log.info("memory plan:\n%s", format_plan(plan))
        return plan

    def _fp8_builder(self, model: str) -> Callable[[torch.device], nn.Module]:
        def build(device: torch.device) -> nn.Module:
            return self.fast.build(model, device, weight_of=self.loras.fuser.pristine)

        return build

    def _compile(self, progress: Callable[[str], None]) -> CompiledTransformers | None:
        """With compilation on, the chosen transformers' repeated blocks compiled now (an fp8 copy's own,
        built here), and run at every warm-up size, so no request compiles."""
        backend = compile_backend(self.settings.compile, self.device)
        if backend is None:
            return None
        compiled = CompiledTransformers(backend, seed_sizes(), self.settings.compile_cache)
        for name in self.settings.compile_models:
            if self.plan[name] == "cpu-only":
                progress(f"compile: {name} does not fit this GPU; not compiled")
                continue
            model, precision = name.rsplit("-", 1)
            started = time.perf_counter()
            self.residency.need([name])
            pipe = self.pipeline(model, "txt2img", precision == "fp8")
            compiled.install([pipe.transformer])
            self.residency.need([CLIP, T5])
            embeds = encode_nothing(pipe, self.device, MODELS[model].max_sequence_length)
            self.residency.need([name])
            compiled.warm_up(pipe, embeds, MODELS[model].max_sequence_length)
            progress(
                f"compile: {name}'s blocks warmed at {len(compiled.sizes)} sizes in "
                f"{time.perf_counter() - started:.1f}s"
            )
        return compiled

    def pipeline(self, model: str, mode: str, fp8: bool) -> object:
        """The pipeline for `model` in `mode`; go_fast's are built on first use, around the fp8 copy."""
        if not fp8:
            return self.pipelines[model][mode]
        if model not in self._fp8_pipelines:
            fp8_transformer = self.residency.module(transformer_component(model, fp8=True))
            self._fp8_pipelines[model] = build_pipelines(self.models, {model: fp8_transformer})[model]
        return self._fp8_pipelines[model][mode]

    def _targets(self, model: str, fp8: bool) -> LoraTargets:
        master = self.models.transformers[model]
        return LoraTargets(
            group=transformer_component(model, fp8),
            transformer=self.residency.module(transformer_component(model, fp8)) if fp8 else master,
            master=master,
            text_encoder=self.models.shared["text_encoder"],
            quantize=self.fast.quantize if fp8 else None,
        )

    def generate(self, request: GenerationRequest) -> Generation:
        """Run `request`: its images in output order, and what it took (timings, counts)."""
        return self.run_prepared(self.prepare(request))

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Everything of `request` before the GPU: whether it fits, its LoRAs downloaded and parsed.
        Touches no weight: many requests' threads may prepare while one runs (`run_prepared`)."""
        self._check_fits(request)
        timings: dict[str, float] = {}
        with timed(timings, "loras"):
            loras = self.loras.prepare(request.model, self.lora_components(request.model), request.loras)
        return PreparedRequest(request, loras, timings)

    def run_prepared(self, prepared: PreparedRequest) -> Generation:
        """The GPU part of a prepared request: one request at a time (the caller's to keep). A cancel
        stops it at the next denoising step (`flux_day.cancel`), its LoRAs restored."""
        request, timings = prepared.request, prepared.timings
        self.steps_done = 0
        try:
            images = self._run(prepared, timings)
        except BaseException as error:
            self._abandon(request, error)
            raise
        generation = Generation(
            images,
            {f"timing.{key}": value for key, value in timings.items()}
            | {
                "images": len(images),
                "steps": request.num_inference_steps * request.num_outputs,
                "megapixels": round(request.width * request.height * len(images) / 1e6, 4),
            },
        )
        log_summary(request, generation)
        return generation

    def _run(self, prepared: PreparedRequest, timings: dict[str, float]) -> list[Image.Image]:
        """The algorithm, and everything a failure or a cancel must undo: LoRAs, denoising, safety."""
        request, loras = prepared.request, prepared.loras
        if request.go_fast and not request.fp8:
            log.info("go_fast: aspect_ratio=custom runs in full precision, as the schema promises")
        pipe = self.pipeline(request.model, request.mode, request.fp8)
        targets = self._targets(request.model, request.fp8)
        # Every LoRA was read (and downloaded) by `prepare`; CLIP's part is fused before the prompt is
        # encoded, the transformer's once it is on the GPU (T5 may share its slot on small cards).
        with timed(timings, "loras"):
            self.loras.activate(
                request.model, targets, request.loras, request.fp8, ("text_encoder",), prepared=loras
            )
        prompt_embeds, pooled_prompt_embeds = self._encode(pipe, request)
        self.residency.need([VAE, request.transformer])
        with timed(timings, "loras"):
            self.loras.activate(request.model, targets, request.loras, go_fast=request.fp8, prepared=loras)
        with timed(timings, "generate"):
            images = self._denoise(pipe, request, prompt_embeds, pooled_prompt_embeds)
        if not request.disable_safety_checker:
            with timed(timings, "safety"):
                self.residency.need([SAFETY])
                images = self.safety.filter(images)
        return images

    def _check_fits(self, request: GenerationRequest) -> None:
        """Refuse a request whose transformer this card cannot run (the plan marks it cpu-only)."""
        if self.plan[request.transformer] == "cpu-only":
            raise CapacityError(
                f"go_fast: {request.transformer} does not fit this GPU (see the memory plan in the setup "
                f"log); set go_fast={'false' if request.fp8 else 'true'}."
            )

    def _abandon(self, request: GenerationRequest, error: BaseException) -> None:
        """A failed or cancelled request (cog raises CancelationException into this thread, anywhere):
        whatever was fused goes, so nothing of this request reaches the next one."""
        self.release_loras()
        log.info(
            "request %s after %d of %d denoising steps; every LoRA restored",
            "cancelled" if not isinstance(error, Exception) else "failed",
            self.steps_done,
            request.num_inference_steps * request.num_outputs,
        )  # no class name: these lines are the prediction's logs, which its sender reads

    def _encode(self, pipe: object, request: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's T5 and pooled CLIP embeddings, once per request."""
        self.residency.need([CLIP, T5])
        with torch.inference_mode():
            prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(
                prompt=request.prompt,
                prompt_2=None,
                device=self.device,
                max_sequence_length=MODELS[request.model].max_sequence_length,
            )
        return prompt_embeds, pooled_prompt_embeds

    def release_loras(self) -> None:
        """Restore every fused weight, full precision and fp8, to the base model's bytes."""
        self.loras.release()

    def use_lora_manager(self, manager: LoraManager) -> None:
        """Hand LoRAs to `manager` from now on, every weight restored first (benchmarks give one that
        reads LoRAs from memory); it should share this engine's `loras.fuser.store` of pristine copies."""
        self.release_loras()
        self.loras = manager
        self.residency.on_leave = manager.fuser.forget

    def _denoise(
        self,
        pipe: object,
        request: GenerationRequest,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
    ) -> list[Image.Image]:
        """One pipeline call per output with its own seed, on the prompt encoded once."""
        with torch.inference_mode():
            return [
                pipe(
                    **call_arguments(request, seed),
                    prompt_embeds=prompt_embeds,
                    pooled_prompt_embeds=pooled_prompt_embeds,
                    callback_on_step_end=self._count_step,
                ).images[0]
                for seed in request.seeds
            ]

    def _count_step(self, pipe: object, step: int, timestep: object, tensors: dict) -> dict:
        """diffusers' per-step hook: counts steps, so a cancel's log line says where it stopped, and
        stops a cancelled request (an async cancel does not reach this thread by itself)."""
        self.steps_done += 1
        stop_if_cancelled()
        return tensors

    def lora_components(self, model: str) -> dict[str, nn.Module]:
        """The modules LoRA files name: this model's full-precision transformer and CLIP's encoder."""
        return self._targets(model, fp8=False).components

    def lora_targets(self, model: str, fp8: bool = False) -> LoraTargets:
        """Where a request's LoRAs go for `model` in full precision or fp8 (go_fast)."""
        return self._targets(model, fp8)
