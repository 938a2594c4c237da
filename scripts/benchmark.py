"""Benchmarks that print a table; every compared variant runs in the same process on the same weights.

    python scripts/benchmark.py overhead [--weights DIR] [--repeats N] [--steps N] [--megapixels 1]
    python scripts/benchmark.py lora-switch [--weights DIR] [--repeats N] [--rank N [N ...]]
    python scripts/benchmark.py setup [--weights DIR] [--device cpu|cuda]
    python scripts/benchmark.py plan [--card 24|48|80|141]
    python scripts/benchmark.py fast [--model dev|schnell|both] [--steps N] [--megapixels 1] [--compile]
                                     [--weights DIR | --random-full-size] [--repeats N]

`overhead`: a request through the Cog `Predictor` (validation, generation, encoding the file) against
a bare diffusers pipeline call with the same arguments, and that call plus saving the same file.
`lora-switch`: replacing one fused LoRA by another (two random LoRAs on every linear of the dev
transformer), per rank: flux-day warm and cold, diffusers unfuse/unload/load/fuse, flux-day's go_fast
switch against torchao quantizing the whole transformer (scripts/bench_lora.py).
`fast`: one image through the full-precision pipeline against the fp8 (go_fast) one, and with
--compile each under torch.compile, per model; prompt embeddings are computed once, outside timing.
--random-full-size (CUDA only) times FLUX.1 at its real size with random weights instead.
`setup`: the predictor's setup against reading the same weight files, and its peak RSS against their
bytes, each in its own process (scripts/bench_setup.py).
`plan`: the memory plan of FLUX.1 at its real size for 24, 48, 80 and 141 GB cards, and what each
request of a mix moves between host and GPU and where its LoRA arithmetic runs (flux_day.memory_sim).
Weights default to a tiny random tree written to a temporary folder.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flux_day.model_specs import MODELS  # noqa: E402  (pure Python: keeps --help fast)
from flux_day.sizes import ASPECT_RATIOS  # noqa: E402


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


def print_table(
    title: str,
    rows: list[tuple[str, list[float]]],
    baseline: str,
    unit: str = "s",
    ratio_label: str | None = None,
    extra: tuple[tuple[str, Callable[[float], float]], ...] = (),
) -> None:
    """Median/min/max of each row in `unit` (s or ms), `extra` columns (header, value from the median
    in seconds), and its median over the baseline's."""
    factor = {"s": 1, "ms": 1000}[unit]
    base = statistics.median(dict(rows)[baseline])
    width = max(34, *(len(name) for name, _ in rows))
    ratio = ratio_label or f"vs {baseline}"
    extra_header = "".join(f" {header:>{max(9, len(header))}}" for header, _ in extra)
    print(f"\n{title}")
    print(f"{'variant':<{width}} {'median ' + unit:>9} {'min ' + unit:>8} {'max ' + unit:>8}", end="")
    print(f"{extra_header} {ratio:>16}")
    for name, seconds in rows:
        median = statistics.median(seconds)
        low, high = min(seconds) * factor, max(seconds) * factor
        columns = "".join(f" {column(median):>{max(9, len(header))}.1f}" for header, column in extra)
        print(f"{name:<{width}} {median * factor:>9.3f} {low:>8.3f} {high:>8.3f}", end="")
        print(f"{columns} {median / base:>15.3f}x")


def overhead(args: argparse.Namespace) -> None:
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
    shutil.rmtree(scratch, ignore_errors=True)


# FLUX.1 at its real size, for `fast --random-full-size`: FluxTransformer2DModel's defaults are FLUX.1's
# transformer (19 double and 38 single blocks, 24 heads of 128 = 3072 wide); the VAE and schedulers
# are FLUX.1's own configs. Module-level so a CPU smoke check can shrink them.
FLUX_TRANSFORMER: dict[str, Any] = {}
FLUX_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
FLUX_SCHEDULERS: dict[str, dict[str, Any]] = {name: dict(spec.scheduler) for name, spec in MODELS.items()}
DEFAULT_STEPS = {name: spec.default_steps for name, spec in MODELS.items()}
# Seconds per 1024x1024 image with go_fast (fp8 transformer, compiled) on an H100/H200, default steps.
TARGETS = {"dev": 2.0, "schnell": 0.45}
FAST_PROMPT = "a red fox in the snow"
_STARTED = time.perf_counter()


def progress(message: str) -> None:
    """A progress line on stderr (compiling FLUX at full size takes minutes of silence otherwise)."""
    print(f"[{time.perf_counter() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def describe_device(device: Any) -> str:
    import torch

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (cc {major}.{minor})"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name}, {torch.get_num_threads()} threads"


@contextmanager
def default_dtype(dtype: Any) -> Iterator[None]:
    """Create modules directly in `dtype` (a FLUX transformer made in float32 first needs 48 GB)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


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
    place: Callable[[str], None] = lambda which: None,
) -> None:
    """Time one image through `full` and `fp8` (pipelines sharing all but the transformer), and with
    --compile each with a compiled transformer, interleaved; print the table. `place("full" | "fp8" |
    "vae")` puts what that run needs on the device first, untimed (the engine's memory plan may keep
    a transformer in CPU RAM between uses)."""
    import torch
    import torchao
    from torch._dynamo.utils import counters

    from flux_day.sizes import aspect_ratio_size

    dtype = full.transformer.dtype
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    steps = args.steps or DEFAULT_STEPS[model]
    width, height = aspect_ratio_size(args.aspect_ratio, args.megapixels)
    precision = str(dtype).removeprefix("torch.")
    pipes = {precision: full, "fp8": fp8}
    needs = {precision: "full", "fp8": "fp8"}
    if args.compile:
        # The options flux_day.fast.compile_transformers uses (inductor, static shapes); the other
        # defaults (mode default, fullgraph=False) as they are.
        for name, pipe in list(pipes.items()):
            compiled = torch.compile(pipe.transformer, backend="inductor", dynamic=False)
            pipes[f"{name} + compile"] = type(pipe)(**{**pipe.components, "transformer": compiled})
            needs[f"{name} + compile"] = needs[name]
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    prompt_embeds, pooled_prompt_embeds = embeds

    def image(pipe: Any) -> Callable[[], None]:
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
                    max_sequence_length=MODELS[model].max_sequence_length,
                ).images[0]
                sync()

        return run

    # The VAE decode and PIL conversion are in every per-image time, the same for all variants:
    # timed alone (interleaved too) so the denoising share per step can be given without them.
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

    decode_name = "VAE decode + PIL"
    runs = {name: image(pipe) for name, pipe in pipes.items()} | {decode_name: decode}
    needs[decode_name] = "vae"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for name, function in runs.items():
        note = " (torch.compile compiles in the first call: minutes at full size)" * ("compile" in name)
        progress(f"{model}: warm-up {name} x{args.warmup}{note}")
        place(needs[name])
        started = time.perf_counter()
        timed(function, repeats=0, warmup=args.warmup)
        progress(f"{model}: warm-up {name} done in {time.perf_counter() - started:.1f}s")
    results: dict[str, list[float]] = {name: [] for name in runs}
    graphs = counters["stats"]["unique_graphs"]
    gc.collect()
    gc.freeze()  # loaded models are long-lived: no full collection rescanning them inside a timing
    try:
        for repeat in range(args.repeats):
            progress(f"{model}: repeat {repeat + 1}/{args.repeats}")
            for name, function in runs.items():
                place(needs[name])
                results[name] += timed(function, repeats=1, warmup=0)
    finally:
        gc.unfreeze()
    # A compile inside the timed repeats would be timed as if it were running: refuse the numbers.
    recompiled = counters["stats"]["unique_graphs"] - graphs
    assert not recompiled, f"{recompiled} graphs compiled during the timed repeats; raise --warmup"
    decode_seconds = statistics.median(results.pop(decode_name))

    title = (
        f"fast: {model} txt2img {width}x{height}, {steps} steps, {args.repeats} repeats after "
        f"{args.warmup} warm-up; {describe_device(device)}; torch {torch.__version__}, "
        f"torchao {torchao.__version__}; {precision} against fp8 = {fp8_config}"
        + ("; compile = torch.compile(transformer, dynamic=False)" if args.compile else "")
        + f"; weights {weights}\n"
        "per image: one pipeline call from precomputed prompt embeddings to a PIL image"
        + (", CUDA synchronized before and after" if cuda else "")
        + f"; ms/step = per image / steps; denoise ms/step = (per image - {decode_name}, "
        f"{decode_seconds * 1000:.1f} ms timed alone) / steps"
    )
    if cuda:
        title += (
            f"\ntarget (go_fast = fp8 + compile, 1024x1024, default steps, H100/H200): "
            f"dev <= {TARGETS['dev']} s, schnell <= {TARGETS['schnell']} s per image"
        )
    print_table(
        title,
        [(name, results[name]) for name in pipes],
        baseline=precision,
        extra=(
            ("ms/step", lambda seconds: seconds / steps * 1000),
            ("denoise ms/step", lambda seconds: (seconds - decode_seconds) / steps * 1000),
        ),
    )
    if cuda:
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
    del pipes, runs
    if args.compile:
        torch.compiler.reset()  # free the compiled graphs before the next model


def fast(args: argparse.Namespace) -> None:
    """`fast` on a weights tree, through the product's Engine and its fp8 pipelines."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    from flux_day.components import transformer_component
    from flux_day.config import Settings
    from flux_day.engine import Engine

    logging.getLogger("flux_day").setLevel(logging.WARNING)
    diffusers_logging.set_verbosity_error()
    # The engine compiles nothing itself (FLUX_DAY_COMPILE=0): the compiled variants are made here,
    # next to uncompiled ones in the same run.
    settings = Settings.from_env(
        {**os.environ, "FLUX_DAY_WEIGHTS": str(args.weights), "FLUX_DAY_COMPILE": "0"}
    )
    progress(f"loading the engine from {args.weights}")
    engine = Engine(settings)
    for model in models(args):
        full, fp8 = engine.pipelines[model]["txt2img"], engine.pipeline(model, "txt2img", fp8=True)
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
        fast_model(
            args,
            model,
            full,
            fp8,
            (prompt_embeds, pooled_prompt_embeds),
            engine.device,
            type(engine.fast.config).__name__,
            str(args.weights),
            real_size=args.weights_given,
            place=place,
        )


def full_size_device() -> Any:
    import torch

    if not torch.cuda.is_available():
        sys.exit(
            "benchmark.py fast --random-full-size needs a CUDA GPU (a full-size FLUX.1 transformer is "
            "12B parameters, 24 GB in bf16) and none is visible here. Without --random-full-size, "
            "`fast` times the same code paths on tiny weights."
        )
    return torch.device("cuda")


def fast_random_full_size(args: argparse.Namespace) -> None:
    """`fast` on FLUX.1 at its real size with random weights (nothing downloaded), built here: no
    text encoders (random prompt embeddings of the real shapes stand in for them), the VAE shared."""
    device = full_size_device()
    import warnings

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.utils import logging as diffusers_logging

    from flux_day.fast import Fp8Transformers

    logging.getLogger("flux_day").setLevel(logging.WARNING)
    diffusers_logging.set_verbosity_error()
    # Random weights may decode to NaN pixels; that costs nothing and is no finding.
    warnings.filterwarnings("ignore", message="invalid value encountered in cast")
    dtype = torch.bfloat16

    def free() -> None:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    with default_dtype(dtype), device:
        vae = AutoencoderKL(**FLUX_VAE).to(dtype).eval()
    for model in models(args):
        progress(f"{model}: random full-size FLUX.1 transformer in {dtype} on {device}")
        with default_dtype(dtype), device:
            transformer = FluxTransformer2DModel(
                **FLUX_TRANSFORMER, guidance_embeds=MODELS[model].guidance_embeds
            )
        transformer = transformer.to(dtype).eval()
        parameters = sum(p.numel() for p in transformer.parameters())
        progress(f"{model}: {parameters / 1e9:.2f}B parameters; quantizing a copy to fp8")
        fp8_transformers = Fp8Transformers({model: transformer}, device)
        free()
        full = FluxPipeline(
            transformer=transformer,
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULERS[model]),
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
        )
        fp8 = FluxPipeline(**{**full.components, "transformer": fp8_transformers.models[model]})
        generator = torch.Generator(device).manual_seed(0)
        config = transformer.config
        text_tokens = MODELS[model].max_sequence_length
        shapes = ((1, text_tokens, config.joint_attention_dim), (1, config.pooled_projection_dim))
        prompt_embeds, pooled_prompt_embeds = (
            torch.randn(shape, generator=generator, device=device, dtype=dtype) for shape in shapes
        )
        fast_model(
            args,
            model,
            full,
            fp8,
            (prompt_embeds, pooled_prompt_embeds),
            device,
            type(fp8_transformers.config).__name__,
            f"random, full size ({parameters / 1e9:.2f}B-parameter transformer)",
            real_size=True,
        )
        # Only one model's transformers on the GPU at a time.
        del full, fp8, fp8_transformers, transformer, prompt_embeds, pooled_prompt_embeds
        free()


def full_size_components() -> dict[str, int]:
    """Bytes of every component of the real FLUX.1 (bf16; fp8 copies as torchao will hold them),
    measured on models built on the meta device from the full-size profile: nothing allocated."""
    import torch

    from flux_day.components import CLIP, SAFETY, T5, VAE, transformer_component
    from flux_day.fast import fp8_bytes
    from flux_day.memory_plan import module_bytes
    from flux_day.weights.random_models import PROFILES, build_models

    models, safety = build_models(PROFILES["full"], torch.device("meta"), torch.bfloat16)
    sizes = {
        CLIP: module_bytes(models.shared["text_encoder"]),
        T5: module_bytes(models.shared["text_encoder_2"]),
        VAE: module_bytes(models.shared["vae"]),
        SAFETY: module_bytes(safety),
    }
    for model, transformer in models.transformers.items():
        sizes[transformer_component(model, fp8=False)] = module_bytes(transformer)
        sizes[transformer_component(model, fp8=True)] = fp8_bytes(transformer)
    return sizes


def plan(args: argparse.Namespace) -> None:
    """The memory plan and, per request of a mix, bytes moved and where the arithmetic runs."""
    from flux_day.memory_plan import format_plan, plan_memory
    from flux_day.memory_sim import CARDS, DEFAULT_MIX, format_simulation, simulate

    sizes = full_size_components()
    print("plan: FLUX.1 at its real size (bf16; fp8 copies made on first use), 10 GiB activation reserve")
    print("      LoRAs cover every linear of the transformer (the worst case); one row per request, in order")
    for card, total in CARDS.items():
        if args.card and not card.startswith(f"{args.card} "):
            continue
        memory = plan_memory(sizes, total)
        print(f"\n{format_plan(memory)}")
        print(format_simulation(card, memory, simulate(memory, DEFAULT_MIX)))


def models(args: argparse.Namespace) -> list[str]:
    return ["dev", "schnell"] if args.model == "both" else [args.model]


def main() -> None:
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
    plan_parser = commands.add_parser("plan", help="memory plan and bytes moved per request, per card")
    plan_parser.add_argument("--card", choices=["24", "48", "80", "141"], help="one card (default: all)")
    args = parser.parse_args()
    if args.command == "plan":
        plan(args)
        return
    if args.command == "fast":
        if (args.steps is not None and args.steps < 1) or args.repeats < 1 or args.warmup < 1:
            parser.error("--steps, --repeats and --warmup must be at least 1")
        args.weights_given = args.weights is not None
        if args.random_full_size:
            fast_random_full_size(args)
            return
    from bench.lora_switch import lora_switch
    from bench.setup import setup

    run = {"overhead": overhead, "lora-switch": lora_switch, "fast": fast, "setup": setup}[args.command]
    if args.weights is not None:
        run(args)
        return
    from flux_day.weights.tiny import write_tiny_weights

    with tempfile.TemporaryDirectory(prefix="flux-day-tiny-") as scratch:
        args.weights = write_tiny_weights(Path(scratch))
        run(args)


if __name__ == "__main__":
    main()
