"""Command line: `python -m flux_day generate "prompt" [options]` runs a generation outside Cog.

The options are the schema's inputs (same names, dashes for underscores), checked by the same
`GenerationRequest`; images are written to `--out` and their paths printed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from flux_day.config import Settings
from flux_day.errors import FluxDayError
from flux_day.outputs import save_image
from flux_day.weights.layout import has_base_models

log = logging.getLogger("flux_day")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flux_day", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate images and write them to --out")
    gen.add_argument("prompt")
    gen.add_argument("--weights", type=Path, help="weights root (default: FLUX_DAY_WEIGHTS)")
    gen.add_argument(
        "--tiny",
        action="store_true",
        help="write tiny random weights to the weights root first if it has none",
    )
    gen.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the images")
    gen.add_argument("--image", type=Path)
    gen.add_argument("--mask", type=Path)
    gen.add_argument("--model", default="dev")
    gen.add_argument("--aspect-ratio", default="1:1")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--megapixels", default="1")
    gen.add_argument("--prompt-strength", type=float, default=0.8)
    gen.add_argument("--num-outputs", type=int, default=1)
    gen.add_argument("--num-inference-steps", type=int, default=28)
    gen.add_argument("--guidance-scale", type=float, default=3.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--output-format", default="webp")
    gen.add_argument("--output-quality", type=int, default=80)
    gen.add_argument("--go-fast", action="store_true")
    gen.add_argument("--replicate-weights", help="a LoRA: owner/model, huggingface.co/..., a URL, ...")
    gen.add_argument("--lora-scale", type=float, default=1.0)
    gen.add_argument("--extra-lora", help="a second LoRA, in any form --replicate-weights takes")
    gen.add_argument("--extra-lora-scale", type=float, default=1.0)
    return parser


def generate(args: argparse.Namespace) -> list[Path]:
    """Run one generation from parsed arguments; return the written files."""
    from flux_day.engine import Engine
    from flux_day.request import GenerationRequest

    # --weights stands for FLUX_DAY_WEIGHTS, so what defaults under it (the LoRA cache) follows it.
    overrides = {"FLUX_DAY_WEIGHTS": str(args.weights)} if args.weights is not None else {}
    settings = Settings.from_env({**os.environ, **overrides})
    if args.tiny and not has_base_models(settings.weights):
        from flux_day.weights.tiny import write_tiny_weights

        log.info("writing tiny random weights to %s", settings.weights)
        write_tiny_weights(settings.weights)
    inputs = {
        name: value for name, value in vars(args).items() if name not in {"command", "weights", "tiny", "out"}
    }
    request = GenerationRequest.from_inputs(**inputs)
    images = Engine(settings).generate(request).images
    args.out.mkdir(parents=True, exist_ok=True)
    return [
        save_image(
            image,
            args.out / f"{request.model}-{seed}.{request.output_format}",
            request.output_format,
            request.output_quality,
        )
        for seed, image in zip(request.seeds, images, strict=True)
    ]


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes print one sentence and exit 2, no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        for path in generate(args):
            print(path)
    except FluxDayError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
