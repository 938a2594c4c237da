"""Benchmarks that print a table; every compared variant runs in the same process on the same weights.

    python scripts/benchmark.py overhead [--weights DIR] [--repeats N] [--steps N] [--megapixels 1]

`overhead`: a request through the Cog `Predictor` (validation, generation, encoding the file) against
a bare diffusers pipeline call with the same arguments, and that call plus saving the same file.
Weights default to a tiny random tree written to a temporary folder.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(function: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        function()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return seconds


def print_table(title: str, rows: list[tuple[str, list[float]]], baseline: str) -> None:
    base = statistics.median(dict(rows)[baseline])
    print(f"\n{title}")
    print(f"{'variant':<34} {'median s':>9} {'min s':>8} {'max s':>8} {'vs ' + baseline:>16}")
    for name, seconds in rows:
        median = statistics.median(seconds)
        print(f"{name:<34} {median:>9.3f} {min(seconds):>8.3f} {max(seconds):>8.3f} {median / base:>15.3f}x")


def overhead(args: argparse.Namespace) -> None:
    import os

    import torch
    from cog import _inspector

    os.environ["FLUX_DAY_WEIGHTS"] = str(args.weights)
    os.environ.setdefault("FLUX_DAY_OFFLINE", "1")
    from flux_day.outputs import save_image
    from predict import Predictor

    predictor = Predictor()
    predictor.setup()
    logging.getLogger("flux_day").setLevel(logging.WARNING)
    inputs = {
        name: field.default
        for name, field in _inspector.create_predictor("predict", "Predictor").inputs.items()
    }
    inputs |= {
        "prompt": "a red fox in the snow",
        "seed": 42,
        "num_inference_steps": args.steps,
        "megapixels": args.megapixels,
    }
    width, height = {"1": (1024, 1024), "0.25": (512, 512)}[args.megapixels]
    pipe = predictor.engine.pipelines["dev"]["txt2img"]
    pipe.set_progress_bar_config(disable=True)
    scratch = Path(tempfile.mkdtemp(prefix="flux-day-bench-"))

    def bare() -> object:
        return pipe(
            prompt=inputs["prompt"],
            width=width,
            height=height,
            num_inference_steps=args.steps,
            guidance_scale=inputs["guidance_scale"],
            generator=torch.Generator("cpu").manual_seed(42),
            max_sequence_length=512,
        ).images[0]

    def bare_and_save() -> None:
        save_image(bare(), scratch / "out.webp", "webp", inputs["output_quality"])

    # Interleave repeats so drift in machine load hits every variant alike.
    results: dict[str, list[float]] = {
        "bare diffusers call": [],
        "bare call + save webp": [],
        "flux-day Predictor.run": [],
    }
    runs = {
        "bare diffusers call": bare,
        "bare call + save webp": bare_and_save,
        "flux-day Predictor.run": lambda: predictor.run(**inputs),
    }
    for function in runs.values():
        timed(function, repeats=0, warmup=1)
    for _ in range(args.repeats):
        for name, function in runs.items():
            results[name] += timed(function, repeats=1, warmup=0)
    rows = list(results.items())
    print_table(
        f"overhead: dev txt2img {width}x{height}, {args.steps} steps, {args.repeats} repeats, "
        f"{predictor.engine.device.type}/{str(predictor.engine.dtype).removeprefix('torch.')}, "
        f"weights {args.weights} (target: Predictor.run <= 1.05x bare call)",
        rows,
        baseline="bare diffusers call",
    )
    predictor.outputs.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    over = commands.add_parser("overhead", help="Predictor.run against a bare diffusers call")
    over.add_argument("--weights", type=Path, help="weights root (default: tiny weights in a temp dir)")
    over.add_argument("--repeats", type=int, default=5)
    over.add_argument("--steps", type=int, default=28)
    over.add_argument("--megapixels", choices=["1", "0.25"], default="1")
    args = parser.parse_args()
    if args.weights is None:
        from flux_day.weights.tiny import write_tiny_weights

        args.weights = write_tiny_weights(Path(tempfile.mkdtemp(prefix="flux-day-tiny-")))
    {"overhead": overhead}[args.command](args)


if __name__ == "__main__":
    main()
