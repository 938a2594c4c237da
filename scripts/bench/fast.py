"""`benchmark.py fast`: one image through the full-precision pipeline against the fp8 (go_fast) one, and
with --compile each under torch.compile, per model, through the product's Engine.

Prompt embeddings are computed once, outside timing. On a weights tree (`--weights`, or tiny weights in
a temporary folder) the engine reads it; with --random-full-size (CUDA only) it is handed FLUX.1 at its
real size with random weights, built on the GPU by `scripts.random_weights.models.build_models` (the
GPU proof's builder): nothing downloaded, the same timing code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from typing import Any

from flux_day.models import MODELS
from scripts.bench.fast_timing import fast_model
from scripts.bench.timing import progress

FAST_PROMPT = "a red fox in the snow"


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

    from scripts.random_weights.models import PROFILES

    device = full_size_device()
    fast_random(args, PROFILES["full"], device, torch.bfloat16)


def fast_random(args: argparse.Namespace, profile: Any, device: Any, dtype: Any) -> None:
    """`fast` on every model of `profile` built with random weights on `device` and handed to an Engine
    (as the GPU proof does); `PROFILES["tiny"]` on the CPU runs the same code in seconds."""
    from flux_day.config import Settings
    from flux_day.engine import Engine
    from scripts.random_weights.models import build_models

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

    from flux_day.models import transformer_component

    for model in models(args):
        full, fp8 = engine.pipelines[f"{model}-full"]["txt2img"], engine.pipeline(model, "txt2img", fp8=True)
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
        fp8_config = type(engine.recipe.fp8).__name__
        embeds = (prompt_embeds, pooled_prompt_embeds)
        fast_model(args, model, full, fp8, embeds, engine.device, fp8_config, weights, real_size, place)


def models(args: argparse.Namespace) -> list[str]:
    """The models `--model` asks for."""
    return ["dev", "schnell"] if args.model == "both" else [args.model]
