"""`benchmark.py compile`: setup's compile as whole-model static graphs (flux-day's design before regional
compilation) against regional compilation (`flux_day.compile`), with inductor on the CPU; one table.

- **Deep tree** (FLUX.1's 19 + 38 blocks at narrow widths: compile time grows with the blocks, not their
  width): each variant's setup compile, the wall time of setup's warm-up (one denoising step per size
  through the pipeline, as the engine runs it) on a cold inductor cache, and the graphs dynamo made.
  Whole-model static graphs take minutes each here, so that variant compiles `--whole-sizes` of the 10
  seed token counts and its setup is extrapolated linearly to all 10 (the table says so).
- **Wide tree** (FLUX.1's real widths, 1 + 2 blocks: what a step costs): one image's denoising (prompt
  embeddings computed once, latents out: compile touches neither the encoders nor the VAE) in eager and
  in each variant, compiled first for that size; runs interleaved, round by round.

The whole-model variant lives here only, as the baseline: a static graph per token count (it compiled
its dynamic graph for odd sizes inside a user's request, so setup never paid for that one).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scripts.bench.fast import quiet
from scripts.bench.timing import describe_device, print_table, progress

EAGER, WHOLE, REGIONAL = "eager", "whole-model static graphs (before)", "regional (repeated blocks)"
SEED_TOKEN_COUNTS = 10


def compile_benchmark(args: argparse.Namespace) -> None:
    """Setup compile on `args.deep`, per-image time on `args.wide`; one table of both."""
    import torch

    quiet()
    setup_seconds, setup_graphs, measured = deep_setup(args)
    per_image = wide_images(args)
    print_table(
        f"compile on {describe_device(torch.device('cpu'))}, inductor: setup on the deep tree "
        f"({args.deep}), one image on the wide tree ({args.wide}, {args.wide_side}² schnell, "
        f"{args.steps} step(s), {args.repeats} runs)",
        [(name, per_image[name]) for name in (EAGER, WHOLE, REGIONAL)],
        baseline=EAGER,
        ratio_label="image vs eager",
        columns=(
            ("setup compile s", {n: f"{s:.1f}" for n, s in setup_seconds.items()}),
            ("graphs at setup", {n: str(g) for n, g in setup_graphs.items()}),
        ),
    )
    whole, regional = setup_seconds[WHOLE], setup_seconds[REGIONAL]
    image_ratio = median(per_image[REGIONAL]) / median(per_image[WHOLE])
    print(
        f"* whole-model setup: {measured[0]} of the {SEED_TOKEN_COUNTS} seed token counts compiled in "
        f"{measured[1]:.1f}s, extrapolated linearly to {SEED_TOKEN_COUNTS} ({whole:.1f}s, "
        f"{SEED_TOKEN_COUNTS} graphs); regional: all {SEED_TOKEN_COUNTS} + an odd size + one token, measured."
    )
    print(
        "  deep: dev's full-precision transformer (float32 on the CPU), one step per size through the "
        "pipeline, cold caches;\n  wide: schnell's; denoising only, latents out, each variant compiled and "
        "run once first. Eager compiles nothing."
    )
    print(
        f"regional setup compile is {whole / regional:.1f}x faster than whole-model (target >= 5x); "
        f"its image takes {image_ratio:.3f}x the whole-model compiled one's (target <= 1.10x)"
    )


def median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


@contextmanager
def cold_inductor_cache() -> Iterator[None]:
    """A fresh inductor cache folder and no compiled graph in this process: each variant compiles cold."""
    import torch

    torch.compiler.reset()
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="flux-day-inductor-") as folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
            torch.compiler.reset()


def engine_on(weights: Path) -> Any:
    """An uncompiled engine on `weights` on the CPU (the variants compile its pipelines here)."""
    from flux_day.config import Settings
    from flux_day.engine import Engine

    env = {**os.environ, "FLUX_DAY_WEIGHTS": str(weights), "FLUX_DAY_DEVICE": "cpu", "FLUX_DAY_COMPILE": "0"}
    return Engine(Settings.from_env(env), progress=progress)


def whole_model_pipe(pipe: Any) -> Any:
    """`pipe` with its transformer as one static graph per token count (the baseline)."""
    import torch

    from flux_day.compile import INDUCTOR_OPTIONS

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, SEED_TOKEN_COUNTS + 2)
    compiled = torch.compile(pipe.transformer, backend="inductor", dynamic=False, options=INDUCTOR_OPTIONS)
    whole = type(pipe)(**{**pipe.components, "transformer": compiled})
    whole.set_progress_bar_config(disable=True)
    return whole


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def deep_setup(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, int], tuple[int, float]]:
    """Setup compile seconds and graphs per variant on the deep tree, and (sizes, seconds) the
    whole-model variant measured before extrapolating."""
    from flux_day.compile import (
        CompiledTransformers,
        encode_prompt,
        repeated_blocks,
        seed_sizes,
        warm_up_sizes,
    )
    from flux_day.models import MODELS

    engine = engine_on(args.deep)
    pipe, text_tokens = engine.pipelines["dev-full"]["txt2img"], MODELS["dev"].max_sequence_length
    pipe.set_progress_bar_config(disable=True)
    embeds = encode_prompt(pipe, "", engine.device, text_tokens)
    regional = CompiledTransformers("inductor", seed_sizes(), None)
    seconds, counts = {EAGER: 0.0}, {EAGER: 0}
    subset = warm_up_sizes(seed_sizes())[: args.whole_sizes]  # seed token counts only
    # Regional first: what one process compiles first pays inductor's one-time costs (its imports, the
    # C++ toolchain's first runs), which only lengthens the regional column.
    with cold_inductor_cache():
        progress(f"deep: regional compilation, warmed at {len(regional.sizes)} sizes")
        start_graphs, started = graphs(), time.perf_counter()
        regional.install([pipe.transformer])
        regional.warm_up(pipe, embeds, text_tokens)
        seconds[REGIONAL] = time.perf_counter() - started
        counts[REGIONAL] = graphs() - start_graphs
    for block in repeated_blocks(pipe.transformer):
        block._compiled_call_impl = None  # the whole-model graphs trace the blocks' own code
    with cold_inductor_cache():
        progress(f"deep: whole-model static graphs at {len(subset)} token counts")
        start_graphs, started = graphs(), time.perf_counter()
        whole = whole_model_pipe(pipe)
        for size in subset:  # as its setup ran: one denoising step per size through the pipeline
            image(whole, embeds, size, 1, text_tokens)()
        measured = time.perf_counter() - started
        per_size_graphs = (graphs() - start_graphs) / len(subset)
    seconds[WHOLE] = measured / len(subset) * SEED_TOKEN_COUNTS
    counts[WHOLE] = round(per_size_graphs * SEED_TOKEN_COUNTS)
    del engine, pipe, whole
    return seconds, counts, (len(subset), measured)


def wide_images(args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds of one image in each variant on the wide tree, interleaved round by round."""
    import torch

    from flux_day.compile import CompiledTransformers, encode_prompt, repeated_blocks
    from flux_day.models import MODELS

    engine = engine_on(args.wide)
    pipe, text_tokens = engine.pipelines["schnell-full"]["txt2img"], MODELS["schnell"].max_sequence_length
    pipe.set_progress_bar_config(disable=True)
    embeds = encode_prompt(pipe, "", engine.device, text_tokens)
    side = args.wide_side
    with cold_inductor_cache():
        whole = whole_model_pipe(pipe)
        blocks = repeated_blocks(pipe.transformer)
        CompiledTransformers("inductor", [(side, side)], None).install([pipe.transformer])
        compiled_calls = [block._compiled_call_impl for block in blocks]

        def regional_on(on: bool) -> None:
            # Eager and whole-model runs see the blocks uncompiled, as they were when it compiled.
            for block, call in zip(blocks, compiled_calls, strict=True):
                block._compiled_call_impl = call if on else None

        # (pipeline, regional blocks on)
        variants: dict[str, tuple[Any, bool]] = {EAGER: (pipe, False), WHOLE: (whole, False)}
        variants[REGIONAL] = (pipe, True)
        call = (side, side), args.steps, text_tokens
        runs = {name: image(p, embeds, *call) for name, (p, _) in variants.items()}
        for name, (_, on) in variants.items():
            progress(f"wide: compiling and warming {name}")
            regional_on(on)
            runs[name]()
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(args.repeats):
            progress(f"wide: round {round_ + 1} of {args.repeats}")
            for name, (_, on) in variants.items():
                regional_on(on)
                started = time.perf_counter()
                runs[name]()
                seconds[name].append(time.perf_counter() - started)
        regional_on(False)
    del engine, pipe, whole
    torch.compiler.reset()
    return seconds


def image(
    pipe: Any, embeds: dict[str, Any], size: tuple[int, int], steps: int, text_tokens: int
) -> Callable[[], None]:
    """One image's denoising at `size` (width, height) from the precomputed embeddings, latents out."""
    import torch

    from flux_day.compile import denoise_latents

    def run() -> None:
        denoise_latents(pipe, embeds, size, steps, text_tokens, torch.Generator("cpu").manual_seed(42))

    return run
