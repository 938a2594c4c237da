"""GPU proof: FLUX.1 at full size with random weights, built in GPU memory, run through the engine; one table.

    python scripts/gpu_proof.py --preflight [--tiny]         # seconds: packages, versions, GPU, disk
    python scripts/gpu_proof.py [--budget 480] [--out DIR]  # CUDA: FLUX.1 dev, schnell, T5-XXL, CLIP-L, VAE
    python scripts/gpu_proof.py --tiny                       # CPU, tiny models: the same code (tested)

Nothing is downloaded or read from disk: `scripts.random_weights.models.build_models` makes every
component on the device (11.9 B parameters per transformer), and `Engine(models=..., safety=...)`
takes them through the same setup path weights read from a tree take, so the memory plan, fp8 copies,
LoRA fuses, residency, compile and safety run as in production. The preflight runs first (before
the clock); then the phases, most important first, each skipped (and said so) when its estimate
from what earlier phases measured would overrun the budget, and cut off at the budget's end:

1. setup as production does it: an engine compiling dev's and schnell's fp8 copies at setup
   (FLUX_DAY_COMPILE, FLUX_DAY_COMPILE_MODELS=dev-fp8,schnell-fp8), timed; if the compile would not
   fit or overruns its limit, an engine without it, and the proof goes on uncompiled;
2. the headline: dev 1024² 28 steps and schnell 1024² 4 steps with go_fast, compiled, end to end
   (`Engine.generate`, safety included), against the targets;
3. the comparisons: full precision, go_fast uncompiled, a bare diffusers `FluxPipeline` call with
   the same arguments; seconds per image and the share of the physical limit (FLOPs per step from
   the token counts; 989 TFLOP/s bf16, 1,979 fp8 dense on H100/H200);
4. img2img and inpaint with go_fast at 0.25 MP; a full-coverage rank-16 LoRA switch, warm and cold;
5. the 80 GB card as an H100 (`scripts/proof/h100.py`): the process capped to 79.2 GiB before setup,
   and the sequence that once leaked a LoRA into the next image;
6. a restart's setup compile (after `torch.compiler.reset()`, the compile cache warm);
with the peak GPU memory of every phase. See README, "GPU proof", for the device command.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.proof.preflight import late_imports, preflight  # noqa: E402 (stdlib only: no torch yet)


def arguments() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models on the CPU: the same code, in seconds"
    )
    parser.add_argument("--preflight", action="store_true", help="only the checks that need no clock")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the proof (default 480)")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    )
    return parser.parse_args()


def run_phases(run, proof) -> None:  # type: ignore[no-untyped-def]
    """The phases in order of importance; each estimates its cost from what the earlier ones measured."""
    from scripts.proof import h100, speed

    scale = run.scale
    compile_needs = scale.compile_s + sum(speed.go_fast_needs(run, m) for m in ("dev", "schnell"))
    setup = lambda compile: lambda: run.start_engine("setup", compile=compile)  # noqa: E731
    if not proof.phase("setup compile", compile_needs, setup(True), limit=scale.compile_limit_s):
        import torch

        run.drop_engine()
        torch.compiler.reset()  # nothing of a compile cut off halfway is kept
        proof.phase("setup", scale.fixed_s, setup(False))
    if run.engine is None:
        return
    for model in ("dev", "schnell"):
        proof.phase(
            f"{model} go_fast", speed.go_fast_needs(run, model), lambda m=model: speed.go_fast(run, m)
        )
    for model in ("dev", "schnell"):
        needs = speed.comparisons_needs(run, model)
        proof.phase(f"{model} comparisons", needs, lambda m=model: speed.comparisons(run, m))
    proof.phase("img2img/inpaint", speed.modes_needs(run), lambda: speed.modes(run))
    proof.phase("LoRA switch", scale.lora_switch_s, lambda: speed.lora_switch(run))
    h100_needs = (run.setup_s or scale.fixed_s) + scale.fixed_s + 4 * run.image_estimate("schnell")
    proof.phase(h100.PHASE, h100_needs, lambda: h100.card_80(run))
    if run.compile_s is None:
        proof.row("restart", "skipped", "-", "setup's compile did not finish: nothing to compare")
    else:
        proof.phase("restart", speed.restart_needs(run), lambda: speed.restart_compile(run))


def main() -> None:
    """The preflight, then (unless `--preflight`) the proof and its table."""
    args = arguments()
    cuda = not args.tiny
    failures = preflight(cuda, args.out, say=lambda line: print(line, file=sys.stderr, flush=True))
    if failures:
        sys.exit(f"gpu_proof.py: {len(failures)} preflight check(s) failed:\n" + "\n".join(failures))
    if args.preflight:
        print("preflight: every check passed", flush=True)
        return
    import logging

    import torch
    from diffusers.utils import logging as diffusers_logging

    from scripts.proof.engine_run import FULL, TINY, Run
    from scripts.proof.table import Proof

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    diffusers_logging.disable_progress_bar()
    scale = TINY if args.tiny else FULL
    checked = set(sys.modules)  # what the preflight imported: the proof should need nothing more
    proof = Proof(args.budget, cuda=cuda, out=args.out)  # the clock starts here
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    versions = {
        name: __import__(name).__version__ for name in ("torch", "diffusers", "torchao", "transformers")
    }
    proof.row("environment", device, "", ", ".join(f"{k} {v}" for k, v in versions.items()))
    with tempfile.TemporaryDirectory(prefix="flux-day-gpu-proof-") as scratch:
        run = Run(scale, proof, Path(scratch))
        if proof.phase("build", scale.fixed_s, run.build):
            run_phases(run, proof)
        run.drop_engine()
    late = late_imports(checked)
    proof.row("preflight", "imported every module the proof used", "NO" if late else "yes", ", ".join(late))
    print(proof.table(), flush=True)
    proof.save()
    if run.models is None:
        sys.exit(1)


if __name__ == "__main__":
    main()
