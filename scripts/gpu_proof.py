"""GPU proof: FLUX.1 at full size with random weights, built in GPU memory, run through the engine; one table.

    python scripts/gpu_proof.py [--budget 480] [--out DIR]  # CUDA: FLUX.1 dev, schnell, T5-XXL, CLIP-L, VAE
    python scripts/gpu_proof.py --tiny                       # CPU, tiny models: the same code (tested)

Nothing is downloaded or read from disk: `flux_day.weights.random_models.build_models` makes every
component on the device (11.9 B parameters per transformer), and `Engine(models=..., safety=...)`
takes them through the same setup path weights read from a tree take, so the memory plan, fp8 copies,
LoRA fuses, residency, compile and safety run as in production. Phases, most important first, each
skipped (and said so) when the time budget would run out:

1. the memory plan for this card;
2. dev 1024² 28 steps and schnell 1024² 4 steps, end to end (`Engine.generate`, safety included):
   full precision, go_fast, a bare diffusers `FluxPipeline` call with the same arguments, and go_fast
   + torch.compile; seconds per image and the share of the physical limit (FLOPs per step from the
   token counts; 989 TFLOP/s bf16, 1,979 fp8 dense on H100/H200);
3. img2img and inpaint with go_fast at 0.25 MP;
4. a full-coverage rank-16 LoRA switch, warm and cold, full precision and go_fast;
5. compile time per size, and again after `torch.compiler.reset()` with inductor's caches warm (what
   a restarted server pays);
6. the same engine planned for an 80 GB card (the process capped to 80 GiB): plan, LoRA switches,
   schnell visiting;
with the peak GPU memory of every phase. See README, "GPU proof", for the device command.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0}  # H100/H200 SXM dense, from the datasheet
PARAMETERS_PER_TOKEN = 6.45e9  # FLUX.1's transformer without its per-image modulation (ANCHORS.md)
TARGETS = {"dev": 1.5, "schnell": 0.35, "switch": 0.3}  # seconds: go_fast image, warm LoRA switch


@dataclass(frozen=True)
class Scale:
    """How big the proof runs: FLUX.1 itself on CUDA, or the tiny models on a CPU."""

    profile: str
    device: str
    dtype: str
    side: int  # image side for the speed phase
    small_side: int  # img2img / inpaint
    steps: dict[str, int]
    rank: int
    backend: str
    repeats: int
    card_80: int  # bytes of the "80 GB card"
    reserve_80: int


FULL = Scale(
    "full", "cuda", "bfloat16", 1024, 512, {"dev": 28, "schnell": 4}, 16, "inductor", 2, 80 * GIB, 10 * GIB
)
TINY = Scale("tiny", "cpu", "float32", 512, 512, {"dev": 2, "schnell": 1}, 4, "aot_eager", 1, 0, 0)


class Proof:
    """The rows of the one table, the time budget, and peak GPU memory per phase."""

    def __init__(self, budget: float, cuda: bool, out: Path | None = None) -> None:
        self.started = time.perf_counter()
        self.budget = budget
        self.cuda = cuda
        self.out = out
        self.rows: list[dict[str, str]] = []

    def save(self) -> None:
        """Write the table so far to `out`: a run cut off by its time limit still leaves its rows."""
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "gpu_proof.json").write_text(json.dumps(self.rows, indent=1))
            (self.out / "gpu_proof.txt").write_text(self.table() + "\n")

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def row(self, phase: str, what: str, value: str, note: str = "") -> None:
        self.rows.append({"phase": phase, "what": what, "value": value, "note": note})
        self.log(f"{phase}: {what} = {value} {note}")

    def phase(self, name: str, needs: float, run: Callable[[], None]) -> None:
        """Run one phase if `needs` seconds are left, and record its peak GPU memory."""
        if self.left() < needs:
            self.row(name, "skipped", "-", f"time budget: {self.left():.0f}s left, needs ~{needs:.0f}s")
            return
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        begun = time.perf_counter()
        try:
            run()
        except Exception as error:  # the proof reports what broke and goes on to the next phase
            self.row(
                name, "FAILED", type(error).__name__, str(error).splitlines()[0][:160] if str(error) else ""
            )
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() / GIB
            self.row(
                name, "peak GPU memory", f"{peak:.1f} GiB", f"phase took {time.perf_counter() - begun:.0f}s"
            )
        self.save()

    def table(self) -> str:
        keys = ("phase", "what", "value")
        width = {key: max(len(key), *(len(row[key]) for row in self.rows)) for key in keys}

        def line(row: dict[str, str]) -> str:
            left = f"{row['phase']:<{width['phase']}}  {row['what']:<{width['what']}}"
            return f"{left}  {row['value']:>{width['value']}}  {row['note']}"

        header = {"phase": "phase", "what": "what", "value": "value", "note": "note"}
        return "\n".join(line(row) for row in [header, *self.rows])


def flops_per_step(image_tokens: int, text_tokens: int) -> float:
    """FLUX.1's transformer per step: linears on every token, and attention over image + text
    (57 blocks, width 3072: QK^T and AV are 2 x 2 x tokens² x width each)."""
    tokens = image_tokens + text_tokens
    return 2 * PARAMETERS_PER_TOKEN * tokens + 4 * tokens**2 * 3072 * 57


def timed(function: Callable[[], object], repeats: int, sync: Callable[[], None]) -> list[float]:
    seconds = []
    for _ in range(repeats):
        sync()
        begun = time.perf_counter()
        function()
        sync()
        seconds.append(time.perf_counter() - begun)
    return seconds


class Run:
    """The engine under proof and the helpers every phase shares."""

    def __init__(self, scale: Scale, proof: Proof, workdir: Path) -> None:
        import torch

        self.scale, self.proof, self.workdir = scale, proof, workdir
        self.device = torch.device(scale.device)
        self.dtype = getattr(torch, scale.dtype)
        self.sync = torch.cuda.synchronize if scale.device == "cuda" else (lambda: None)
        self.settings_env = {
            "FLUX_DAY_WEIGHTS": str(workdir / "weights"),
            "FLUX_DAY_DEVICE": scale.device,
            "FLUX_DAY_OFFLINE": "1",
            "FLUX_DAY_COMPILE": "0",
            "FLUX_DAY_FP8_CACHE": "0",
            "FLUX_DAY_COMPILE_CACHE": str(workdir / "compile-cache"),
        }
        self.models: Any = None
        self.safety: Any = None
        self.engine: Any = None

    def build(self) -> None:
        import torch

        from flux_day.memory_plan import module_bytes
        from flux_day.weights.random_models import PROFILES, build_models

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

    def start_engine(self, card: Any = None) -> None:
        from flux_day.config import Settings
        from flux_day.engine import Engine
        from flux_day.memory_plan import format_plan

        begun = time.perf_counter()
        self.engine = Engine(
            Settings.from_env(self.settings_env), models=self.models, safety=self.safety, card=card
        )
        self.sync()
        name = "80 GB card" if card is not None else "this card"
        self.proof.row("setup", f"Engine(...) planned for {name}", f"{time.perf_counter() - begun:.1f} s")
        print(f"\nmemory plan for {name}:\n{format_plan(self.engine.plan)}\n", flush=True)

    def report(self, model: str, what: str, seconds: list[float], precision: str) -> None:
        """One speed row: median seconds per image, its share of the physical limit, the target."""
        from flux_day.model_specs import MODELS

        steps, side = self.scale.steps[model], self.scale.side
        flops = flops_per_step((side // 16) ** 2, MODELS[model].max_sequence_length) * steps
        median = statistics.median(seconds)
        share = ""
        if self.scale.profile == "full":
            share = f"{flops / median / (PEAK_TFLOPS[precision] * 1e12):.0%} of the {precision} limit"
        target = TARGETS[model] if "go_fast" in what and self.scale.profile == "full" else None
        verdict = "" if target is None else f"target <= {target} s: {_met(median <= target)}"
        self.proof.row(
            f"{model} {side}² {steps} steps", what, f"{median:.3f} s", f"{share} {verdict}".strip()
        )

    def request(self, model: str, go_fast: bool, side: int, **inputs: Any) -> Any:
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


def speed(run: Run, model: str) -> None:
    """Full precision, go_fast and a bare diffusers call, per 1024² image (median of repeats)."""
    import torch
    from diffusers import FluxPipeline

    from flux_day.model_specs import MODELS

    engine, scale = run.engine, run.scale
    steps, side = scale.steps[model], scale.side
    text_tokens = MODELS[model].max_sequence_length

    def report(what: str, seconds: list[float], precision: str) -> None:
        run.report(model, what, seconds, precision)

    def generate(go_fast: bool) -> Callable[[], object]:
        request = run.request(model, go_fast, side)
        return lambda: engine.generate(request)

    for what, go_fast, precision in (
        ("full precision", False, "bf16"),
        ("go_fast (fp8 eager)", True, "fp8"),
    ):
        generate(go_fast)()  # warm-up (go_fast: makes the fp8 copy)
        report(what, timed(generate(go_fast), scale.repeats, run.sync), precision)
    bare = FluxPipeline(**engine.pipelines[model]["txt2img"].components)
    bare.set_progress_bar_config(disable=True)

    def bare_call() -> object:
        with torch.inference_mode():
            return bare(
                prompt="a red fox in the snow",
                width=side,
                height=side,
                num_inference_steps=steps,
                guidance_scale=3.0,
                generator=torch.Generator("cpu").manual_seed(7),
                max_sequence_length=text_tokens,
            ).images[0]

    bare_call()
    report("bare diffusers FluxPipeline (bf16)", timed(bare_call, scale.repeats, run.sync), "bf16")


def compiled_speed(run: Run, model: str) -> None:
    """go_fast + torch.compile at 1024²: the compile itself (cold caches), the image after it, and for
    dev the compile again after `torch.compiler.reset()` with inductor's caches warm on disk."""
    import torch

    from flux_day.compile import CompiledTransformers

    engine, scale, proof = run.engine, run.scale, run.proof
    side, steps = scale.side, scale.steps[model]
    fp8 = engine.pipeline(model, "txt2img", fp8=True).transformer
    cache = Path(run.settings_env["FLUX_DAY_COMPILE_CACHE"])
    CompiledTransformers(scale.backend, [(side, side)], cache).install([fp8])
    request = run.request(model, True, side)
    begun = time.perf_counter()
    engine.generate(request)
    cold = f"{time.perf_counter() - begun:.1f} s"
    proof.row(f"{model} {side}² {steps} steps", f"compile {side}² ({scale.backend})", cold, "cold caches")
    seconds = timed(lambda: engine.generate(request), scale.repeats, run.sync)
    run.report(model, "go_fast (fp8 + compile)", seconds, "fp8")
    if model == "dev":
        torch.compiler.reset()
        begun = time.perf_counter()
        engine.generate(request)
        warm = f"{time.perf_counter() - begun:.1f} s"
        proof.row("compile", f"{side}² again after torch.compiler.reset()", warm, "inductor's caches warm")


def modes(run: Run) -> None:
    """img2img and inpaint with go_fast at 0.25 MP."""
    from PIL import Image

    side = run.scale.small_side
    image, mask = run.workdir / "image.png", run.workdir / "mask.png"
    Image.linear_gradient("L").convert("RGB").resize((side, side)).save(image)
    Image.new("L", (side, side), 255).save(mask)
    for mode, extra in (
        ("img2img", {"image": str(image)}),
        ("inpaint", {"image": str(image), "mask": str(mask)}),
    ):
        request = run.request("dev", True, side, **extra)
        run.engine.generate(request)  # warm-up
        seconds = timed(lambda r=request: run.engine.generate(r), run.scale.repeats, run.sync)
        run.proof.row(f"{mode} {side}² go_fast", "per image", f"{statistics.median(seconds):.3f} s")


def lora_switch(run: Run, label: str) -> None:
    """A full-coverage LoRA switch A <-> B, warm and cold, in full precision and go_fast."""
    import torch

    from scripts.bench.lora_switch import lora_state_dict, use_in_memory_loras

    engine, scale = run.engine, run.scale
    master = engine.lora_targets("dev").master
    linears = {n: m for n, m in master.named_modules() if isinstance(m, torch.nn.Linear)}
    states = {name: lora_state_dict(linears, scale.rank, seed) for seed, name in ((1, "A"), (2, "B"))}
    requests = use_in_memory_loras(engine, states)
    for go_fast in (False, True):
        for cold in (False, True):
            median = _switch_seconds(run, requests, go_fast, cold)
            judged = not cold and scale.profile == "full"
            verdict = (
                f"target <= {TARGETS['switch']} s: {_met(median <= TARGETS['switch'])}" if judged else ""
            )
            precision = "go_fast" if go_fast else "full precision"
            kind = "cold (parse)" if cold else "warm"
            run.proof.row(
                f"LoRA switch ({label})",
                f"rank {scale.rank}, {len(linears)} linears, {precision}, {kind}",
                f"{median:.3f} s",
                verdict,
            )
    engine.release_loras()


def _switch_seconds(run: Run, requests: dict, go_fast: bool, cold: bool) -> float:
    """Median seconds of switching between the two LoRAs (both parsed, or parsed again when cold)."""
    engine = run.engine
    targets = engine.lora_targets("dev", fp8=go_fast)
    current = ["A"]
    engine.loras.activate("dev", targets, requests["A"], go_fast=go_fast)

    def switch() -> None:
        current[0] = "B" if current[0] == "A" else "A"
        if cold:
            engine.loras.forget_parsed()
        engine.loras.activate("dev", targets, requests[current[0]], go_fast=go_fast)

    switch()  # warm-up
    return statistics.median(timed(switch, max(2, run.scale.repeats), run.sync))


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def card_80(run: Run) -> None:
    """The same models planned for an 80 GB card, the process capped to it."""
    import torch

    from flux_day.engine import Card

    run.engine.release_loras()
    run.engine = None
    gc.collect()
    if run.scale.device == "cuda":
        torch.cuda.empty_cache()
        card = Card(run.scale.card_80, run.scale.reserve_80)
    else:  # a CPU "card" that offloads schnell as 80 GB does at full size
        from flux_day.memory_sim import card_offloading_schnell
        from flux_day.models import component_sizes

        card = Card(card_offloading_schnell(component_sizes(run.models, run.safety)), 0)
    run.start_engine(card)
    if run.scale.device == "cuda":
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, card.total_bytes / torch.cuda.get_device_properties(0).total_memory)
        )
    placement = ", ".join(f"{c.name}={c.placement}" for c in run.engine.plan.components)
    run.proof.row("80 GB card", "placement", "see note", placement)
    lora_switch(run, "80 GB card")
    request = run.request("schnell", True, run.scale.small_side)
    begun = time.perf_counter()
    run.engine.generate(request)
    run.sync()
    run.proof.row(
        "80 GB card",
        "first schnell go_fast 0.25 MP (visits, fp8 made)",
        f"{time.perf_counter() - begun:.2f} s",
    )
    seconds = timed(lambda: run.engine.generate(request), run.scale.repeats, run.sync)
    run.proof.row("80 GB card", "schnell go_fast 0.25 MP again", f"{statistics.median(seconds):.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models on the CPU: the same code, in seconds"
    )
    parser.add_argument(
        "--budget", type=float, default=480.0, help="seconds for the whole proof (default 480)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    )
    args = parser.parse_args()
    import logging

    import torch
    from diffusers.utils import logging as diffusers_logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    diffusers_logging.disable_progress_bar()
    scale = TINY if args.tiny else FULL
    if scale.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_proof.py needs a CUDA GPU (FLUX.1 at full size); --tiny runs the same code on the CPU")
    proof = Proof(args.budget, cuda=scale.device == "cuda", out=args.out)
    device = torch.cuda.get_device_name(0) if proof.cuda else "CPU"
    versions = {
        name: __import__(name).__version__ for name in ("torch", "diffusers", "torchao", "transformers")
    }
    proof.row("environment", device, "", ", ".join(f"{k} {v}" for k, v in versions.items()))
    with tempfile.TemporaryDirectory(prefix="flux-day-gpu-proof-") as scratch:
        run = Run(scale, proof, Path(scratch))
        proof.phase("build", 30, run.build)
        if run.models is None:
            print(proof.table())
            sys.exit(1)
        proof.phase("setup", 20, run.start_engine)
        proof.phase("LoRA switch", 20, lambda: lora_switch(run, "this card"))
        for model in ("dev", "schnell"):
            proof.phase(f"speed {model}", 60 if model == "dev" else 30, lambda m=model: speed(run, m))
        proof.phase("img2img/inpaint", 15, lambda: modes(run))
        # Compiling FLUX takes minutes: last on this card, each model only if it can still finish.
        for model in ("schnell", "dev"):
            proof.phase(f"compile {model}", 150, lambda m=model: compiled_speed(run, m))
        proof.phase("80 GB card", 40, lambda: card_80(run))
    print(proof.table(), flush=True)
    proof.save()


if __name__ == "__main__":
    main()
