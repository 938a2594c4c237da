"""`benchmark.py fast`: one image through the full-precision pipeline against the fp8 (go_fast) one, and
with --compile each under torch.compile, per model, through the product's Engine.

Prompt embeddings are computed once, outside timing. On a weights tree (`--weights`, or tiny weights in
a temporary folder) the engine reads it; with --random-full-size (CUDA only) it is handed FLUX.1 at its
real size with random weights, built on the GPU by `flux_day.weights.random_models.build_models` (the
GPU proof's builder): nothing downloaded, the same timing code.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flux_day.model_specs import MODELS
from scripts.bench.timing import describe_device, print_table, progress, timed

DEFAULT_STEPS = {name: spec.default_steps for name, spec in MODELS.items()}
# Seconds per 1024x1024 image with go_fast (fp8 transformer, compiled) on an H100/H200, default steps.
TARGETS = {"dev": 2.0, "schnell": 0.45}
FAST_PROMPT = "a red fox in the snow"
DECODE = "VAE decode + PIL"


def fast(args: argparse.Namespace) -> None:
    """`fast` on the weights tree `args.weights`, through the Engine and its fp8 pipelines."""
    from flux_day.config import Settings
    from flux_day.engine import Engine

    quiet()
    # The engine compiles nothing itself (FLUX_DAY_COMPILE=0): the compiled variants are made here,
    # next to uncompiled ones in the same run.
    settings = Settings.from_env(
        {**os.environ, "FLUX_DAY_WEIGHTS": str(args.weights), "FLUX_DAY_COMPILE": "0"}
    )
    progress(f"loading the engine from {args.weights}")
    time_engine(args, Engine(settings), str(args.weights), real_size=args.weights_given)


def fast_random_full_size(args: argparse.Namespace) -> None:
    """`fast` on FLUX.1 at its real size with random weights, built on the GPU (CUDA only)."""
    import torch

    from flux_day.weights.random_models import PROFILES

    device = full_size_device()
    fast_random(args, PROFILES["full"], device, torch.bfloat16)


def fast_random(args: argparse.Namespace, profile: Any, device: Any, dtype: Any) -> None:
    """`fast` on every model of `profile` built with random weights on `device` and handed to an Engine
    (as the GPU proof does); `PROFILES["tiny"]` on the CPU runs the same code in seconds."""
    from flux_day.config import Settings
    from flux_day.engine import Engine
    from flux_day.weights.random_models import build_models

    quiet()
    # Random weights may decode to NaN pixels; that costs nothing and is no finding.
    warnings.filterwarnings("ignore", message="invalid value encountered in cast")
    progress(f"random {profile.name}-size FLUX.1 in {str(dtype).removeprefix('torch.')} on {device}")
    models, safety = build_models(profile, device, dtype)
    parameters = sum(p.numel() for p in models.transformers["dev"].parameters())
    with tempfile.TemporaryDirectory(prefix="flux-day-bench-random-") as scratch:
        env = {
            **os.environ,
            "FLUX_DAY_WEIGHTS": scratch,  # nothing is read from it: the models are given
            "FLUX_DAY_DEVICE": device.type,
            "FLUX_DAY_OFFLINE": "1",
            "FLUX_DAY_COMPILE": "0",
            "FLUX_DAY_FP8_CACHE": "0",
        }
        engine = Engine(Settings.from_env(env), models=models, safety=safety)
        weights = f"random, {profile.name} size ({parameters / 1e9:.2f}B-parameter transformer)"
        time_engine(args, engine, weights, real_size=profile.name == "full")


def full_size_device() -> Any:
    """The CUDA device, or exit saying why --random-full-size needs one."""
    import torch

    if not torch.cuda.is_available():
        sys.exit(
            "benchmark.py fast --random-full-size needs a CUDA GPU (a full-size FLUX.1 transformer is "
            "12B parameters, 24 GB in bf16) and none is visible here. Without --random-full-size, "
            "`fast` times the same code paths on tiny weights."
        )
    return torch.device("cuda")


def quiet() -> None:
    """Only warnings from flux-day and diffusers: the table is the output."""
    from diffusers.utils import logging as diffusers_logging

    logging.getLogger("flux_day").setLevel(logging.WARNING)
    diffusers_logging.set_verbosity_error()


def time_engine(args: argparse.Namespace, engine: Any, weights: str, real_size: bool) -> None:
    """Per model asked for: the engine's full-precision and fp8 txt2img pipelines, timed by `fast_model`
    with the engine's residency putting what each run needs on the device first."""
    import torch

    from flux_day.components import transformer_component

    for model in models(args):
        full, fp8 = engine.pipelines[model]["txt2img"], engine.pipeline(model, "txt2img", fp8=True)
        transformers = {
            "full": transformer_component(model, fp8=False),
            "fp8": transformer_component(model, fp8=True),
        }
        cpu_only = [name for name in transformers.values() if engine.residency.plan[name] == "cpu-only"]
        if cpu_only:
            sys.exit(f"{', '.join(cpu_only)} cannot run on this GPU (the engine's memory plan: cpu-only)")

        def place(which: str, transformers: dict[str, str] = transformers) -> None:
            engine.residency.need(["vae", *([transformers[which]] if which in transformers else [])])

        engine.residency.need(["clip", "t5"])
        with torch.inference_mode():  # once per request in the engine, outside every timing here
            prompt_embeds, pooled_prompt_embeds, _ = full.encode_prompt(
                prompt=FAST_PROMPT,
                prompt_2=None,
                device=engine.device,
                max_sequence_length=MODELS[model].max_sequence_length,
            )
        fp8_config = type(engine.fast.config).__name__
        embeds = (prompt_embeds, pooled_prompt_embeds)
        fast_model(args, model, full, fp8, embeds, engine.device, fp8_config, weights, real_size, place)


def models(args: argparse.Namespace) -> list[str]:
    """The models `--model` asks for."""
    return ["dev", "schnell"] if args.model == "both" else [args.model]


def fast_model(
    args: argparse.Namespace,
    model: str,
    full: Any,
    fp8: Any,
    embeds: tuple[Any, Any],
    device: Any,
    fp8_config: str,
    weights: str,
    real_size: bool,
    place: Callable[[str], None],
) -> None:
    """Time one image through `full` and `fp8` (pipelines sharing all but the transformer), and with
    --compile each with a compiled transformer, interleaved; print the table. `place("full" | "fp8" |
    "vae")` puts what that run needs on the device first, untimed (the engine's memory plan may keep
    a transformer in CPU RAM between uses)."""
    import torch

    from flux_day.sizes import aspect_ratio_size

    precision = str(full.transformer.dtype).removeprefix("torch.")
    steps = args.steps or DEFAULT_STEPS[model]
    width, height = aspect_ratio_size(args.aspect_ratio, args.megapixels)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    pipes, needs = variant_pipelines({precision: full, "fp8": fp8}, args.compile)
    size = (width, height, steps, MODELS[model].max_sequence_length)
    runs = {name: image_call(pipe, embeds, size, sync) for name, pipe in pipes.items()}
    runs[DECODE] = decode_call(full, width, height, device, sync)
    variants = Variants(model, runs, needs | {DECODE: "vae"}, place)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    variants.warm_up(args.warmup)
    results = variants.interleaved(args.repeats)
    decode_seconds = statistics.median(results.pop(DECODE))
    what = (precision, fp8_config, weights)
    print_table(
        fast_title(args, model, (width, height, steps), device, what, decode_seconds),
        [(name, results[name]) for name in pipes],
        baseline=precision,
        extra=(
            ("ms/step", lambda seconds: seconds / steps * 1000),
            ("denoise ms/step", lambda seconds: (seconds - decode_seconds) / steps * 1000),
        ),
    )
    if device.type == "cuda":
        judge_target(args, model, results, (width, height, steps), real_size, device)
    del pipes, runs, variants
    if args.compile:
        torch.compiler.reset()  # free the compiled graphs before the next model


def variant_pipelines(pipes: dict[str, Any], compile_too: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """The pipelines to time by variant name (with --compile, each again with a compiled transformer),
    and which transformer ("full" or "fp8") each needs on the device."""
    import torch

    needs = dict(zip(pipes, ("full", "fp8"), strict=True))
    if compile_too:
        # The options flux_day.fast.compile_transformers uses (inductor, static shapes); the other
        # defaults (mode default, fullgraph=False) as they are.
        for name, pipe in list(pipes.items()):
            compiled = torch.compile(pipe.transformer, backend="inductor", dynamic=False)
            pipes[f"{name} + compile"] = type(pipe)(**{**pipe.components, "transformer": compiled})
            needs[f"{name} + compile"] = needs[name]
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes, needs


def image_call(
    pipe: Any, embeds: tuple[Any, Any], size: tuple[int, int, int, int], sync: Callable[[], None]
) -> Callable[[], None]:
    """One image from the precomputed prompt embeddings; `size` is (width, height, steps, text tokens)."""
    import torch

    width, height, steps, text_tokens = size
    prompt_embeds, pooled_prompt_embeds = embeds

    def run() -> None:
        with torch.inference_mode():
            sync()
            pipe(
                prompt_embeds=prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                width=width,
                height=height,
                num_inference_steps=steps,
                guidance_scale=3.5,
                generator=torch.Generator("cpu").manual_seed(42),  # as the engine seeds
                max_sequence_length=text_tokens,
            ).images[0]
            sync()

    return run


def decode_call(
    full: Any, width: int, height: int, device: Any, sync: Callable[[], None]
) -> Callable[[], None]:
    """The VAE decode and PIL conversion alone. They are in every per-image time, the same for all
    variants: timed alone (interleaved too) so the denoising share per step can be given without them."""
    import torch

    vae = full.vae
    latents = torch.randn(
        1,
        vae.config.latent_channels,
        height // full.vae_scale_factor,
        width // full.vae_scale_factor,
        generator=torch.Generator("cpu").manual_seed(0),
    ).to(device, vae.dtype)

    def decode() -> None:
        with torch.inference_mode():
            sync()
            scaled = latents / vae.config.scaling_factor + vae.config.shift_factor
            full.image_processor.postprocess(vae.decode(scaled, return_dict=False)[0], output_type="pil")
            sync()

    return decode


@dataclass
class Variants:
    """A model's calls to time by name, which transformer each needs on the device ("full", "fp8" or
    "vae" for none), and `place`, which puts it there untimed."""

    model: str
    runs: dict[str, Callable[[], None]]
    needs: dict[str, str]
    place: Callable[[str], None]

    def warm_up(self, warmup: int) -> None:
        """`warmup` untimed calls of every variant (compiling, where compiled), with progress lines."""
        for name, function in self.runs.items():
            note = " (torch.compile compiles in the first call: minutes at full size)" * ("compile" in name)
            progress(f"{self.model}: warm-up {name} x{warmup}{note}")
            self.place(self.needs[name])
            started = time.perf_counter()
            timed(function, repeats=0, warmup=warmup)
            progress(f"{self.model}: warm-up {name} done in {time.perf_counter() - started:.1f}s")

    def interleaved(self, repeats: int) -> dict[str, list[float]]:
        """Seconds of every variant, `repeats` rounds of one call each, with no collection and no
        compile inside a timing (a graph compiled during the repeats would be timed as if it ran)."""
        from torch._dynamo.utils import counters

        results: dict[str, list[float]] = {name: [] for name in self.runs}
        graphs = counters["stats"]["unique_graphs"]
        gc.collect()
        gc.freeze()  # loaded models are long-lived: no full collection rescanning them inside a timing
        try:
            for repeat in range(repeats):
                progress(f"{self.model}: repeat {repeat + 1}/{repeats}")
                for name, function in self.runs.items():
                    self.place(self.needs[name])
                    results[name] += timed(function, repeats=1, warmup=0)
        finally:
            gc.unfreeze()
        recompiled = counters["stats"]["unique_graphs"] - graphs
        assert not recompiled, f"{recompiled} graphs compiled during the timed repeats; raise --warmup"
        return results


def fast_title(
    args: argparse.Namespace,
    model: str,
    shape: tuple[int, int, int],
    device: Any,
    what: tuple[str, str, str],
    decode_seconds: float,
) -> str:
    """The table's title: what ran, on what, and how per-step columns are computed; `what` is
    (precision, fp8 config, weights)."""
    import torch
    import torchao

    (width, height, steps), (precision, fp8_config, weights) = shape, what
    cuda = device.type == "cuda"
    title = (
        f"fast: {model} txt2img {width}x{height}, {steps} steps, {args.repeats} repeats after "
        f"{args.warmup} warm-up; {describe_device(device)}; torch {torch.__version__}, "
        f"torchao {torchao.__version__}; {precision} against fp8 = {fp8_config}"
        + ("; compile = torch.compile(transformer, dynamic=False)" if args.compile else "")
        + f"; weights {weights}\n"
        "per image: one pipeline call from precomputed prompt embeddings to a PIL image"
        + (", CUDA synchronized before and after" if cuda else "")
        + f"; ms/step = per image / steps; denoise ms/step = (per image - {DECODE}, "
        f"{decode_seconds * 1000:.1f} ms timed alone) / steps"
    )
    if cuda:
        title += (
            f"\ntarget (go_fast = fp8 + compile, 1024x1024, default steps, H100/H200): "
            f"dev <= {TARGETS['dev']} s, schnell <= {TARGETS['schnell']} s per image"
        )
    return title


def judge_target(
    args: argparse.Namespace,
    model: str,
    results: dict[str, list[float]],
    shape: tuple[int, int, int],
    real_size: bool,
    device: Any,
) -> None:
    """On CUDA: the go_fast target's verdict where the run can judge it, and the peak GPU memory."""
    import torch

    width, height, steps = shape
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    default_run = (width, height) == (1024, 1024) and steps == DEFAULT_STEPS[model]
    if real_size and args.compile and default_run:
        seconds, target = statistics.median(results["fp8 + compile"]), TARGETS[model]
        verdict = "met" if seconds <= target else "NOT met"
        print(f"target {model} <= {target} s per image (fp8 + compile): {verdict}, {seconds:.3f} s")
    else:
        print(
            f"target not judged: it needs real-size weights, --compile, 1024x1024 and "
            f"{DEFAULT_STEPS[model]} steps"
        )
    print(f"peak GPU memory allocated while timing: {peak:.1f} GiB")
