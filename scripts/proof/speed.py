"""The timed phases: go_fast compiled (the production path) first, then what it is compared with, then
img2img/inpaint, LoRA switches and what a restarted server's compile costs. Each phase's estimate
comes from what the phases before it measured (`Run.image_estimate`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from scripts.proof.engine_run import TARGETS, Run, met, timed


def go_fast(run: Run, model: str) -> None:
    """The headline: go_fast at `side` on the engine as set up (compiled unless its compile was cut
    off), the first request after setup (it should compile nothing), then the median of repeats."""
    request = run.request(model, True, run.scale.side)
    what = "go_fast (fp8 + compile)" if run.compiled else "go_fast (fp8 eager)"
    first = timed(lambda: run.engine.generate(request), 1, run.sync)[0]
    run.proof.row(
        f"{model} {run.scale.side}² {run.scale.steps[model]} steps",
        "first request after setup",
        f"{first:.3f} s",
        "includes whatever setup did not warm",
    )
    seconds = timed(lambda: run.engine.generate(request), run.scale.repeats, run.sync)
    run.report(model, what, "go_fast" if run.compiled else "go_fast eager", seconds, "fp8")


def go_fast_needs(run: Run, model: str) -> float:
    """A warm-up and the repeats of the go_fast image."""
    return (1 + run.scale.repeats) * run.image_estimate(model)


def comparisons(run: Run, model: str) -> None:
    """Full precision, go_fast without compiling (when the headline was compiled: the same engine
    under `torch.compiler.set_stance("force_eager")`) and a bare diffusers call with the same
    arguments, per image (a warm-up, then the median of repeats)."""
    import torch
    from diffusers import FluxPipeline

    from flux_day.models import MODELS

    scale, engine = run.scale, run.engine

    def generate(fast: bool) -> Callable[[], object]:
        request = run.request(model, fast, scale.side)
        return lambda: engine.generate(request)

    def measure(what: str, variant: str, call: Callable[[], object], precision: str) -> None:
        call()  # warm-up
        run.report(model, what, variant, timed(call, scale.repeats, run.sync), precision)

    measure("full precision", "full precision", generate(False), "bf16")
    if run.compiled:
        with torch.compiler.set_stance("force_eager"):
            measure("go_fast (fp8 eager)", "go_fast eager", generate(True), "fp8")
    bare = FluxPipeline(**engine.pipelines[f"{model}-full"]["txt2img"].components)
    bare.set_progress_bar_config(disable=True)

    def bare_call() -> object:
        with torch.inference_mode():
            return bare(
                prompt="a red fox in the snow",
                width=scale.side,
                height=scale.side,
                num_inference_steps=scale.steps[model],
                guidance_scale=3.0,
                generator=torch.Generator("cpu").manual_seed(7),
                max_sequence_length=MODELS[model].max_sequence_length,
            ).images[0]

    dtype = str(engine.dtype).removeprefix("torch.")
    measure(f"bare diffusers FluxPipeline ({dtype})", "bare", bare_call, "bf16")


def comparisons_needs(run: Run, model: str) -> float:
    """A warm-up and the repeats of each compared variant."""
    variants = ["full precision", "bare", *(["go_fast eager"] if run.compiled else [])]
    return (1 + run.scale.repeats) * sum(run.image_estimate(model, v) for v in variants)


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


def modes_needs(run: Run) -> float:
    """img2img and inpaint at the small side, from dev's go_fast image."""
    share = (run.scale.small_side / run.scale.side) ** 2
    return 2 * (1 + run.scale.repeats) * share * run.image_estimate("dev") + run.scale.fixed_s / 4


def lora_switch(run: Run) -> None:
    """A full-coverage LoRA switch A <-> B on dev, warm and cold, in full precision and go_fast."""
    import torch

    from scripts.bench.lora_switch import lora_state_dict, use_in_memory_loras

    engine, scale = run.engine, run.scale
    master = engine.models.transformers["dev"]
    linears = {n: m for n, m in master.named_modules() if isinstance(m, torch.nn.Linear)}
    states = {name: lora_state_dict(linears, scale.rank, seed) for seed, name in ((1, "A"), (2, "B"))}
    requests = use_in_memory_loras(engine, states)
    for fast in (False, True):
        for cold in (False, True):
            median = _switch_seconds(run, requests, fast, cold)
            judged = not cold and scale.profile == "full"
            verdict = f"target <= {TARGETS['switch']} s: {met(median <= TARGETS['switch'])}" if judged else ""
            precision = "go_fast" if fast else "full precision"
            kind = "cold (parse)" if cold else "warm"
            run.proof.row(
                "LoRA switch",
                f"rank {scale.rank}, {len(linears)} linears, {precision}, {kind}",
                f"{median:.3f} s",
                verdict,
            )
    engine.loras.release()


def _switch_seconds(run: Run, requests: dict, fast: bool, cold: bool) -> float:
    """Median seconds of switching between the two LoRAs (both parsed, or parsed again when cold)."""
    engine = run.engine
    components = engine.lora_components("dev")
    fp8 = engine.pipeline("dev", "txt2img", fp8=True).transformer if fast else None
    current = ["A"]
    engine.loras.activate("dev", components, requests["A"], go_fast=fast, fp8=fp8)

    def switch() -> None:
        current[0] = "B" if current[0] == "A" else "A"
        if cold:
            engine.loras.forget_parsed()
        engine.loras.activate("dev", components, requests[current[0]], go_fast=fast, fp8=fp8)

    switch()  # warm-up
    return statistics.median(timed(switch, max(2, run.scale.repeats), run.sync))


def restart_compile(run: Run) -> None:
    """What a restarted server's setup pays: a new engine compiling at setup after
    `torch.compiler.reset()`, with the compile cache its first setup filled, then one go_fast image
    (nothing left to compile)."""
    import torch

    cold = run.compile_s
    run.drop_engine()
    torch.compiler.reset()
    run.start_engine("restart", compile=True)
    note = f"cold: {cold:.1f} s" + (" (inductor's caches warm)" if run.scale.backend == "inductor" else "")
    run.proof.row(
        "restart", "setup compile again after torch.compiler.reset()", f"{run.compile_s:.1f} s", note
    )
    request = run.request("dev", True, run.scale.side)
    begun = time.perf_counter()
    run.engine.generate(request)
    run.sync()
    run.proof.row("restart", "first dev go_fast request after it", f"{time.perf_counter() - begun:.3f} s")


def restart_needs(run: Run) -> float:
    """At most what the cold setup with its compile took, and an image."""
    return (run.compile_s or run.scale.compile_s) + (run.setup_s or 0) + 2 * run.image_estimate("dev")
