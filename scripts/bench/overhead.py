"""`benchmark.py overhead`: a request through the Cog `Predictor` (validation, generation, encoding the
file) against a bare diffusers pipeline call with the same arguments, and that call plus saving the file.

The predictor's input defaults come from cog's own reading of `predict.py`
(`scripts/openapi_schema.read_predictor`), as its server sees them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.bench.timing import print_table, timed
from scripts.openapi_schema import read_predictor

ROOT = Path(__file__).resolve().parents[2]
BASELINE = "bare diffusers call"


def overhead(args: argparse.Namespace) -> None:
    """Time the three variants interleaved, `args.repeats` times each, and print the table."""
    os.environ["FLUX_DAY_WEIGHTS"] = str(args.weights)
    os.environ.setdefault("FLUX_DAY_OFFLINE", "1")
    from flux_day.outputs import save_image
    from predict import Predictor

    predictor = Predictor()
    predictor.setup()
    logging.getLogger("flux_day").setLevel(logging.WARNING)
    inputs = {name: field.default for name, field in read_predictor(ROOT).inputs.items()}
    inputs |= {
        "prompt": "a red fox in the snow",
        "seed": 42,
        "num_inference_steps": args.steps,
        "megapixels": args.megapixels,
    }
    width, height = {"1": (1024, 1024), "0.25": (512, 512)}[args.megapixels]
    bare = bare_call(predictor.engine.pipelines["dev-full"]["txt2img"], inputs, width, height)
    scratch = Path(tempfile.mkdtemp(prefix="flux-day-bench-"))
    loop = asyncio.new_event_loop()  # `run` is async (concurrent predictions); one loop, as coglet's

    def bare_and_save() -> None:
        save_image(bare(), scratch / "out.webp", "webp", inputs["output_quality"])

    runs = {
        BASELINE: bare,
        "bare call + save webp": bare_and_save,
        "flux-day Predictor.run": lambda: loop.run_until_complete(predictor.run(**inputs)),
    }
    results: dict[str, list[float]] = {name: [] for name in runs}
    for function in runs.values():
        timed(function, repeats=0, warmup=1)
    # Interleave repeats so drift in machine load hits every variant alike.
    for _ in range(args.repeats):
        for name, function in runs.items():
            results[name] += timed(function, repeats=1, warmup=0)
    print_table(
        f"overhead: dev txt2img {width}x{height}, {args.steps} steps, {args.repeats} repeats, "
        f"{predictor.engine.device.type}/{str(predictor.engine.dtype).removeprefix('torch.')}, "
        f"weights {args.weights} (target: Predictor.run <= 1.05x bare call)",
        list(results.items()),
        baseline=BASELINE,
    )
    predictor.outputs.clear()
    shutil.rmtree(scratch, ignore_errors=True)


def bare_call(pipe: Any, inputs: dict[str, Any], width: int, height: int) -> Callable[[], object]:
    """The diffusers call the predictor makes for `inputs`, with the same arguments, made bare."""
    import torch

    pipe.set_progress_bar_config(disable=True)

    def bare() -> object:
        return pipe(
            prompt=inputs["prompt"],
            width=width,
            height=height,
            num_inference_steps=inputs["num_inference_steps"],
            guidance_scale=inputs["guidance_scale"],
            generator=torch.Generator("cpu").manual_seed(42),
            max_sequence_length=512,
        ).images[0]

    return bare
