"""`benchmark.py fast` for one model: the pipelines per variant, one image and the VAE decode as timed
calls, warm-up and interleaved repeats with the engine placing what each needs, the table's title and,
on CUDA, the go_fast target's verdict."""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flux_day.models import MODELS
from scripts.bench.timing import describe_device, print_table, progress, timed

DEFAULT_STEPS = {name: spec.default_steps for name, spec in MODELS.items()}
# Seconds per 1024x1024 image with go_fast (fp8 transformer, compiled) on an H100/H200, default steps.
TARGETS = {"dev": 2.0, "schnell": 0.45}
DECODE = "VAE decode + PIL"


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
        # The options flux_day.fp8.compile_transformers uses (inductor, static shapes); the other
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
