"""Benchmarks that print a table; every compared variant runs in the same process on the same weights.

    python scripts/benchmark.py overhead [--weights DIR] [--repeats N] [--steps N] [--megapixels 1]
    python scripts/benchmark.py lora-switch [--weights DIR] [--repeats N] [--rank N [N ...]]
    python scripts/benchmark.py setup [--weights DIR] [--device cpu|cuda]
    python scripts/benchmark.py plan [--card 24|48|80|141]
    python scripts/benchmark.py concurrency [--weights DIR] [--burst N] [--concurrency N] [--file-seconds S]
    python scripts/benchmark.py fast [--model dev|schnell|both] [--steps N] [--megapixels 1] [--compile]
                                     [--weights DIR | --random-full-size] [--repeats N]
    python scripts/benchmark.py compile [--deep DIR] [--wide DIR] [--whole-sizes N] [--wide-side PX]
                                        [--steps N] [--repeats N]

`overhead`: a request through the Cog `Predictor` (validation, generation, encoding the file) against
a bare diffusers pipeline call with the same arguments, and that call plus saving the same file.
`lora-switch`: replacing one fused LoRA by another (two random LoRAs on every linear of the dev
transformer), per rank: flux-day warm and cold, diffusers unfuse/unload/load/fuse, flux-day's go_fast
switch against torchao quantizing the whole transformer.
`fast`: one image through the full-precision pipeline against the fp8 (go_fast) one, and with
--compile each under torch.compile, per model; prompt embeddings are computed once, outside timing.
--random-full-size (CUDA only) times FLUX.1 at its real size with random weights instead.
`setup`: the predictor's setup against reading the same weight files, and its peak RSS against their
bytes, each in its own process.
`compile`: setup's compile with inductor on the CPU, whole-model static graphs (before) against regional
compilation: compile time and graphs on the deep tree, one image against eager on the wide tree
(trees written to a temporary folder when not given: the wide one is GBs).
`concurrency`: a burst of requests, each with its own cold LoRA from a loopback host that takes
--file-seconds per file, through the real Cog server at --concurrency against 1: makespans, 409s, and
every image against the same request run alone (and asserts the burst takes under half the time).
`plan`: the memory plan of FLUX.1 at its real size for 24, 48, 80 and 141 GB cards, and what each
request of a mix moves between host and GPU and where its LoRA arithmetic runs (scripts.bench.memory_model).
Weights default to a tiny random tree written to a temporary folder. Each question is a module of
`scripts/bench/` (overhead, lora_switch, setup, fast, plan, compile, concurrency); timing and tables are
`scripts/bench/timing.py`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Every module below imports torch and the models only when its question runs: --help stays fast.
from flux_day.sizes import ASPECT_RATIOS  # noqa: E402
from scripts.bench.compile import compile_benchmark  # noqa: E402
from scripts.bench.concurrency import concurrency  # noqa: E402
from scripts.bench.fast import fast, fast_random_full_size  # noqa: E402
from scripts.bench.lora_switch import lora_switch  # noqa: E402
from scripts.bench.overhead import overhead  # noqa: E402
from scripts.bench.plan import plan  # noqa: E402
from scripts.bench.setup import setup  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per question, each with its own flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    over = commands.add_parser("overhead", help="Predictor.run against a bare diffusers call")
    over.add_argument("--weights", type=Path, help="weights root (default: tiny weights in a temp dir)")
    over.add_argument("--repeats", type=int, default=5)
    over.add_argument("--steps", type=int, default=28)
    over.add_argument("--megapixels", choices=["1", "0.25"], default="1")
    switch = commands.add_parser("lora-switch", help="switching fused LoRAs: flux-day against diffusers")
    switch.add_argument("--weights", type=Path, help="weights root (default: tiny weights in a temp dir)")
    switch.add_argument("--repeats", type=int, default=5)
    switch.add_argument("--rank", type=int, nargs="+", default=[16, 64], help="one table per rank")
    fast_parser = commands.add_parser(
        "fast", help="full precision against fp8 (go_fast), optionally compiled: per image and per step"
    )
    where = fast_parser.add_mutually_exclusive_group()
    where.add_argument("--weights", type=Path, help="weights root (default: tiny weights in a temp dir)")
    where.add_argument(
        "--random-full-size",
        action="store_true",
        help="CUDA only: FLUX.1 at its real size with random weights (nothing downloaded)",
    )
    fast_parser.add_argument("--model", choices=["dev", "schnell", "both"], default="both")
    fast_parser.add_argument("--steps", type=int, help="default: 28 for dev, 4 for schnell")
    fast_parser.add_argument("--megapixels", choices=["1", "0.25"], default="1")
    fast_parser.add_argument("--aspect-ratio", choices=sorted(ASPECT_RATIOS), default="1:1")
    fast_parser.add_argument("--compile", action="store_true", help="also each variant under torch.compile")
    fast_parser.add_argument("--repeats", type=int, default=3)
    fast_parser.add_argument("--warmup", type=int, default=1, help="untimed calls per variant first")
    setup_parser = commands.add_parser("setup", help="cold start against reading the weight files; peak RSS")
    setup_parser.add_argument(
        "--weights", type=Path, help="weights root (default: tiny weights in a temp dir)"
    )
    setup_parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    compile_parser = commands.add_parser(
        "compile", help="setup compile and per-image time: whole-model static graphs against regional"
    )
    compile_parser.add_argument("--deep", type=Path, help="deep tree (default: written to a temp dir)")
    compile_parser.add_argument("--wide", type=Path, help="wide tree (default: written to a temp dir, GBs)")
    compile_parser.add_argument(
        "--whole-sizes", type=int, default=2, help="seed token counts whole-model compiles (of 10)"
    )
    compile_parser.add_argument("--wide-side", type=int, default=256, help="the wide tree's image side")
    compile_parser.add_argument("--steps", type=int, default=1, help="denoising steps per image")
    compile_parser.add_argument("--repeats", type=int, default=5)
    burst = commands.add_parser("concurrency", help="a burst with cold LoRAs: concurrency N against 1")
    burst.add_argument("--weights", type=Path, help="weights root (default: tiny weights in a temp dir)")
    burst.add_argument("--burst", type=int, default=8, help="requests sent at once")
    burst.add_argument("--concurrency", type=int, default=8, help="the server's COG_MAX_CONCURRENCY")
    burst.add_argument("--file-seconds", type=float, default=2.0, help="seconds the host takes per LoRA")

    plan_parser = commands.add_parser("plan", help="memory plan and bytes moved per request, per card")
    plan_parser.add_argument("--card", choices=["24", "48", "80", "141"], help="one card (default: all)")
    return parser


def main() -> None:
    """Run the subcommand asked for, on tiny weights in a temporary folder unless --weights is given."""
    parser = build_parser()
    args = parser.parse_args()
    if args.command == "plan":
        plan(args)
        return
    if args.command == "compile":
        with tempfile.TemporaryDirectory(prefix="flux-day-trees-") as scratch:
            compile_trees(args, Path(scratch))
        return
    if args.command == "fast":
        if (args.steps is not None and args.steps < 1) or args.repeats < 1 or args.warmup < 1:
            parser.error("--steps, --repeats and --warmup must be at least 1")
        args.weights_given = args.weights is not None
        if args.random_full_size:
            fast_random_full_size(args)
            return
    run = {
        "overhead": overhead,
        "lora-switch": lora_switch,
        "fast": fast,
        "setup": setup,
        "concurrency": concurrency,
    }[args.command]
    if args.weights is not None:
        run(args)
        return
    from scripts.random_weights.tree import write_tiny_weights

    with tempfile.TemporaryDirectory(prefix="flux-day-tiny-") as scratch:
        args.weights = write_tiny_weights(Path(scratch))
        run(args)


def compile_trees(args: argparse.Namespace, scratch: Path) -> None:
    """`compile` on the deep and wide trees given, writing under `scratch` those that are not."""
    from scripts.random_weights.tree import write_tiny_weights

    if not 1 <= args.whole_sizes <= 10 or args.steps < 1 or args.repeats < 1:
        raise SystemExit("--whole-sizes must be 1 to 10; --steps and --repeats at least 1")
    for profile in ("deep", "wide"):
        if getattr(args, profile) is None:
            setattr(args, profile, write_tiny_weights(scratch / profile, profile=profile))
    compile_benchmark(args)


if __name__ == "__main__":
    main()
