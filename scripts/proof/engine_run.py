"""`Scale` (FLUX.1 at full size on CUDA, or the tiny models on a CPU) and `Run`, the engine under proof.

`Run` holds the random models, the engine built on them (its settings as the environment would give
them), and what earlier phases measured, from which later phases estimate their cost.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.proof.table import Proof

PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0}  # H100/H200 SXM dense, from the datasheet
PARAMETERS_PER_TOKEN = 6.45e9  # FLUX.1's transformer without its per-image modulation
TARGETS = {"dev": 1.5, "schnell": 0.35, "switch": 0.3}  # seconds: go_fast image, warm LoRA switch
COMPILED_MODELS = "dev-fp8,schnell-fp8"  # the production path: go_fast, compiled at setup


@dataclass(frozen=True)
class Scale:
    """How big the proof runs, and what a phase is expected to cost before anything is measured."""

    profile: str
    device: str
    dtype: str
    side: int  # image side for the speed phases
    small_side: int  # img2img, inpaint, the 80 GB card's sequence
    steps: dict[str, int]
    rank: int
    backend: str
    repeats: int
    image_s: dict[str, float]  # a go_fast image at `side` before one is measured
    compile_s: float  # setup's compile of both fp8 transformers, regional, cold caches
    compile_limit_s: float  # where setup's compile is cut off (then the proof goes on uncompiled)
    lora_switch_s: float  # the LoRA switch phase
    fixed_s: float  # what a phase costs beyond its images (moves, fp8 builds, pinned copies)


FULL = Scale(
    "full", "cuda", "bfloat16", 1024, 512, {"dev": 28, "schnell": 4}, 16, "inductor", 2,
    image_s={"dev": 3.0, "schnell": 0.8}, compile_s=120, compile_limit_s=240, lora_switch_s=45, fixed_s=40,
)  # fmt: skip
TINY = Scale(
    "tiny", "cpu", "float32", 512, 512, {"dev": 2, "schnell": 1}, 4, "aot_eager", 1,
    image_s={"dev": 0.5, "schnell": 0.3}, compile_s=8, compile_limit_s=16, lora_switch_s=3, fixed_s=2,
)  # fmt: skip


def flops_per_step(image_tokens: int, text_tokens: int) -> float:
    """FLUX.1's transformer per step: linears on every token, and attention over image + text
    (57 blocks, width 3072: QK^T and AV are 2 x 2 x tokens² x width each)."""
    tokens = image_tokens + text_tokens
    return 2 * PARAMETERS_PER_TOKEN * tokens + 4 * tokens**2 * 3072 * 57


def timed(function: Callable[[], object], repeats: int, sync: Callable[[], None]) -> list[float]:
    """Seconds of each of `repeats` calls, the device synchronised around each."""
    seconds = []
    for _ in range(repeats):
        sync()
        begun = time.perf_counter()
        function()
        sync()
        seconds.append(time.perf_counter() - begun)
    return seconds


def met(ok: bool) -> str:
    """A target's verdict."""
    return "met" if ok else "NOT met"


class Run:
    """The engine under proof, the helpers every phase shares, and what phases measured."""

    def __init__(self, scale: Scale, proof: Proof, workdir: Path) -> None:
        import torch

        self.scale, self.proof, self.workdir = scale, proof, workdir
        self.device = torch.device(scale.device)
        self.dtype = getattr(torch, scale.dtype)
        self.cuda = scale.device == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.models: Any = None
        self.safety: Any = None
        self.engine: Any = None
        self.compiled = False  # the engine compiled its fp8 transformers at setup
        self.setup_s: float | None = None  # an engine's setup without compiling
        self.compile_s: float | None = None  # setup with its compile, cold caches
        self.image_s: dict[tuple[str, str], float] = {}  # (model, variant) -> median seconds per image

    def settings_env(self, compile: bool) -> dict[str, str]:
        """The settings contract as the proof sets it: weights never read, compile as asked."""
        return {
            "FLUX_DAY_WEIGHTS": str(self.workdir / "weights"),
            "FLUX_DAY_DEVICE": self.scale.device,
            "FLUX_DAY_OFFLINE": "1",
            "FLUX_DAY_COMPILE": self.scale.backend if compile else "0",
            "FLUX_DAY_COMPILE_MODELS": COMPILED_MODELS,
            "FLUX_DAY_FP8_CACHE": "0",
            "FLUX_DAY_COMPILE_CACHE": str(self.workdir / "compile-cache"),
        }

    def build(self) -> None:
        """FLUX.1 (or the tiny models) with random weights, made on the device."""
        import torch

        from flux_day.residency import module_bytes
        from scripts.random_weights.models import PROFILES, build_models

        begun = time.perf_counter()
        self.models, self.safety = build_models(PROFILES[self.scale.profile], self.device, self.dtype)
        self.sync()
        parameters = sum(p.numel() for p in self.models.transformers["dev"].parameters())
        total = sum(module_bytes(m) for m in self.models.transformers.values())
        self.proof.row(
            "build",
            "random FLUX.1 on the device",
            f"{time.perf_counter() - begun:.1f} s",
            f"{parameters / 1e9:.2f} B parameters per transformer, both {total / 1e9:.1f} GB, "
            f"{torch.__version__}",
        )

    def start_engine(self, phase: str, compile: bool, card: Any = None) -> None:
        """A new engine on the models (the previous one dropped first), timed as setup; the engine's
        own progress lines (its compile per transformer) become rows."""
        from flux_day.config import Settings
        from flux_day.engine import Engine
        from flux_day.memory_plan import format_plan

        self.drop_engine()
        begun = time.perf_counter()
        self.engine = Engine(
            Settings.from_env(self.settings_env(compile)),
            models=self.models,
            safety=self.safety,
            budget=card,
            progress=lambda message: self.proof.row(phase, "engine", message),
        )
        self.sync()
        seconds = time.perf_counter() - begun
        self.compiled = compile
        if compile:
            self.compile_s = seconds
        else:
            self.setup_s = seconds
        compiled = f"compiled at setup: {COMPILED_MODELS} ({self.scale.backend})" if compile else "no compile"
        self.proof.row(phase, "Engine(...) setup", f"{seconds:.1f} s", compiled)
        print(f"\nmemory plan ({phase}):\n{format_plan(self.engine.plan)}\n", flush=True)

    def drop_engine(self) -> None:
        """Forget the engine (its fp8 copies and compiled graphs' references) and free its memory."""
        import torch

        if self.engine is not None:
            self.engine.loras.release()
        self.engine = None
        self.compiled = False
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def image_estimate(self, model: str, variant: str = "go_fast") -> float:
        """Seconds per image at `side`: measured, else derived from the go_fast image, else the prior
        (full precision and a bare diffusers call cost up to 3x a compiled fp8 image)."""
        factor = {"go_fast": 1.0, "go_fast eager": 2.0, "full precision": 3.0, "bare": 3.0}[variant]
        if (model, variant) in self.image_s:
            return self.image_s[(model, variant)]
        return factor * self.image_s.get((model, "go_fast"), self.scale.image_s[model])

    def report(self, model: str, what: str, variant: str, seconds: list[float], precision: str) -> None:
        """One speed row: median seconds per image, its share of the physical limit, the target."""
        from flux_day.models import MODELS

        steps, side = self.scale.steps[model], self.scale.side
        flops = flops_per_step((side // 16) ** 2, MODELS[model].max_sequence_length) * steps
        median = statistics.median(seconds)
        self.image_s[(model, variant)] = median
        share = ""
        if self.scale.profile == "full":
            share = f"{flops / median / (PEAK_TFLOPS[precision] * 1e12):.0%} of the {precision} limit"
        target = TARGETS[model] if variant == "go_fast" and self.scale.profile == "full" else None
        verdict = "" if target is None else f"target <= {target} s: {met(median <= target)}"
        self.proof.row(
            f"{model} {side}² {steps} steps", what, f"{median:.3f} s", f"{share} {verdict}".strip()
        )

    def request(self, model: str, go_fast: bool, side: int, **inputs: Any) -> Any:
        """A checked txt2img request (or img2img/inpaint with `inputs`) at `side`, seed 7."""
        from flux_day.request import GenerationRequest

        return GenerationRequest.from_inputs(
            prompt="a red fox in the snow",
            model=model,
            go_fast=go_fast,
            aspect_ratio="1:1",
            megapixels="1" if side == 1024 else "0.25",
            num_inference_steps=self.scale.steps[model],
            seed=7,
            **inputs,
        )
