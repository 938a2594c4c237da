"""`benchmark.py lora-switch`: replacing one fused LoRA by another, flux-day against diffusers and torchao.

Two random LoRAs (A, B) on every linear of the dev transformer, PEFT layout with an alpha per module
(alpha/rank = 0.5, so alpha handling is compared too), per rank asked for. The same tensors go to
flux-day as safetensors bytes and to diffusers as a state dict. Variants, interleaved per repeat:

- flux-day warm switch A <-> B in full precision, both LoRAs already parsed;
- flux-day cold switch (parsed again from bytes in memory; the download is excluded);
- diffusers `unfuse_lora` + `unload_lora_weights` + `load_lora_weights` + `fuse_lora` on its own
  pipeline (same transformer weights);
- flux-day go_fast warm switch: the fp8 copy's layers become quantize(master + LoRA);
- torchao `quantize_` of the whole transformer (a fresh copy each time; copying is not timed): what
  re-quantizing everything would cost, the bound a go_fast switch must stay under.

The pristine copies each variant keeps (to restore bit-exactly) are a column. Targets: warm switch
>= 5x faster than diffusers' path; the go_fast switch <= 1.0x the whole-model quantize_.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def lora_state_dict(linears: dict, rank: int, seed: int) -> dict:
    """A random LoRA on every linear of `linears`, PEFT layout, alpha = rank / 2."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, linear in linears.items():
        state |= {
            f"transformer.{name}.lora_A.weight": torch.randn(rank, linear.in_features, generator=generator)
            * 0.1,
            f"transformer.{name}.lora_B.weight": torch.randn(linear.out_features, rank, generator=generator)
            * 0.1,
            f"transformer.{name}.alpha": torch.tensor(rank / 2),
        }
    return state


def use_in_memory_loras(engine, state_dicts: dict, reads: dict | None = None) -> dict:
    """Give `engine` a LoRA manager whose transfer is a dict lookup (a cache miss then costs exactly
    what `activate` does once the bytes have arrived), and return a request per LoRA label."""
    from contextlib import contextmanager

    from flux_day.loras.manager import LoraManager, LoraRef, LoraRequest
    from tests.harness.lora_files import data_uri, to_bytes

    blobs = {label: to_bytes(state) for label, state in state_dicts.items()}
    by_source = {data_uri(blob): blob for blob in blobs.values()}
    counts = reads if reads is not None else {"cold": 0}

    class InMemoryLoraManager(LoraManager):
        @contextmanager
        def _lora_file(self, ref: LoraRef):
            counts["cold"] += 1
            yield by_source[ref.location]

    engine.release_loras()
    engine.loras = InMemoryLoraManager(engine.settings, engine.loras.fuser.store)
    engine.residency.on_leave = engine.loras.fuser.forget
    return {
        label: [LoraRequest.parse("replicate_weights", data_uri(blob), 1.0)] for label, blob in blobs.items()
    }


def _table(title: str, rows: dict[str, list[float]], memory: dict[str, str], baseline: str) -> None:
    base = statistics.median(rows[baseline])
    width = max(len(name) for name in rows)
    print(f"\n{title}")
    header = f"{'variant':<{width}} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'pristine GB':>12}"
    print(f"{header} {'vs ' + baseline[:22]:>26}")
    for name, seconds in rows.items():
        median = statistics.median(seconds)
        print(
            f"{name:<{width}} {median * 1000:>10.1f} {min(seconds) * 1000:>9.1f} {max(seconds) * 1000:>9.1f} "
            f"{memory.get(name, '-'):>12} {median / base:>25.2f}x"
        )


def lora_switch(args: argparse.Namespace) -> None:
    from diffusers import FluxPipeline
    from diffusers.utils import logging as diffusers_logging

    from flux_day.config import Settings
    from flux_day.engine import Engine
    from flux_day.weights.layout import DEV_FOLDER

    logging.getLogger("flux_day").setLevel(logging.WARNING)
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    settings = Settings.from_env(
        {
            **os.environ,
            "FLUX_DAY_WEIGHTS": str(args.weights),
            "FLUX_DAY_FP8_CACHE": "0",
            "FLUX_DAY_COMPILE": "0",
        }
    )
    engine = Engine(settings)
    transformer = engine.lora_targets("dev").master
    pristine = {k: v.clone() for k, v in transformer.state_dict().items()}
    diffusers_pipe = FluxPipeline.from_pretrained(
        args.weights / DEV_FOLDER, dtype=engine.dtype, text_encoder_2=None, vae=None
    )
    diffusers_pipe.to(engine.device)
    for rank in args.rank:
        _one_rank(args, engine, diffusers_pipe, rank, pristine)


def _one_rank(args, engine, diffusers_pipe, rank: int, pristine: dict) -> None:
    """One table: every variant switching between two random LoRAs of `rank`, interleaved."""
    import torch
    from torchao.quantization import quantize_

    model = "dev"
    full, fast = engine.lora_targets(model, fp8=False), engine.lora_targets(model, fp8=True)
    transformer = full.master
    linears = {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else lambda: None
    state_dicts = {label: lora_state_dict(linears, rank, seed) for seed, label in ((1, "A"), (2, "B"))}
    reads = {"cold": 0}
    requests = use_in_memory_loras(engine, state_dicts, reads)
    fused = {"full": "none", "fast": "none", "diffusers": "none"}

    def other(current: str) -> str:
        return "B" if current == "A" else "A"

    def flux_day(targets: object, which: str, cold: bool = False) -> Callable[[], None]:
        def switch() -> None:
            label = other(fused[which])
            kept = engine.loras._parsed.copy() if cold else None
            if cold:
                engine.loras._parsed.clear()
            state = engine.loras.activate(model, targets, requests[label], go_fast=which == "fast")
            sync()
            if kept is not None:
                engine.loras._parsed = kept  # the warm variants keep finding both LoRAs parsed
            assert len(state.written) == len(linears), "not a full switch"
            fused[which] = label

        return switch

    def diffusers_switch() -> None:
        label = other(fused["diffusers"])
        diffusers_pipe.unfuse_lora()
        diffusers_pipe.unload_lora_weights()
        diffusers_pipe.load_lora_weights(dict(state_dicts[label]), adapter_name=label)
        diffusers_pipe.fuse_lora()
        sync()
        fused["diffusers"] = label

    fresh: list[torch.nn.Module] = []

    def whole_quantize() -> None:
        quantize_(fresh.pop(), engine.fast.config)
        sync()

    warm, cold = "flux-day warm switch", "flux-day cold switch (parse, no download)"
    diffusers_name = "diffusers unfuse+unload+load+fuse"
    go_fast, quantize_name = "flux-day go_fast warm switch", "torchao quantize_ whole transformer"
    runs = {
        warm: flux_day(full, "full"),
        cold: flux_day(full, "full", cold=True),
        diffusers_name: diffusers_switch,
        go_fast: flux_day(fast, "fast"),
        quantize_name: whole_quantize,
    }
    results: dict[str, list[float]] = {name: [] for name in runs}
    for name, function in runs.items():  # warm-up: also fills the warm variants' parsed LoRAs
        for _ in range(2):
            if name == quantize_name:
                fresh.append(copy.deepcopy(transformer))
            function()
    gc.collect()
    gc.freeze()  # loaded models are long-lived: no full collection rescanning them inside a timing
    reads["cold"] = 0
    for _ in range(args.repeats):
        for name, function in runs.items():
            if name == quantize_name:
                fresh.append(copy.deepcopy(transformer))  # untimed
            started = time.perf_counter()
            function()
            results[name].append(time.perf_counter() - started)
    gc.unfreeze()
    assert reads["cold"] == args.repeats, f"LoRA files read: {reads}"
    _check_against_diffusers(engine, full, fused, flux_day, diffusers_pipe, linears)
    engine.release_loras()
    for key, value in transformer.state_dict().items():
        assert torch.equal(value, pristine[key]), f"{key} not restored bit-exactly"

    fuser = engine.loras.fuser
    memory = {
        warm: f"{fuser.pristine_bytes('dev-full') / 1e9:.2f}",
        cold: f"{fuser.pristine_bytes('dev-full') / 1e9:.2f}",
        go_fast: f"{fuser.pristine_bytes('dev-fp8') / 1e9:.2f}",
        diffusers_name: "0 (lossy)",
        quantize_name: "-",
    }
    parameters = sum(v.numel() for k, v in state_dicts["A"].items() if not k.endswith("alpha"))
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears.values())
    _table(
        f"lora-switch: LoRA A <-> B on all {len(linears)} linears of the dev transformer "
        f"({weight_bytes / 1e9:.2f} GB of weights), rank {rank}, {parameters / 1e6:.1f} M LoRA "
        f"parameters, {args.repeats} repeats, {engine.device.type}/"
        f"{str(engine.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, "
        f"weights {args.weights}",
        results,
        memory,
        baseline=warm,
    )
    speedup = statistics.median(results[diffusers_name]) / statistics.median(results[warm])
    ratio = statistics.median(results[go_fast]) / statistics.median(results[quantize_name])
    print(
        f"targets: warm switch >= 5x faster than diffusers: {'met' if speedup >= 5 else 'NOT met'} "
        f"({speedup:.1f}x); go_fast switch <= 1.0x whole-model quantize_: "
        f"{'met' if ratio <= 1.0 else 'NOT met'} ({ratio:.2f}x). Fused weights match diffusers; no "
        "LoRA restores every weight bit-exactly."
    )


def _check_against_diffusers(engine, full, fused, flux_day, diffusers_pipe, linears) -> None:
    """Apples to apples: both paths leave the same fused weights for the same LoRA."""
    import torch

    tolerance = 1e-5 if engine.dtype == torch.float32 else 1e-2
    if fused["full"] != fused["diffusers"]:
        flux_day(full, "full")()
    theirs = dict(diffusers_pipe.transformer.named_modules())
    for name, linear in linears.items():
        weight = getattr(theirs[name], "base_layer", theirs[name]).weight
        assert torch.allclose(linear.weight, weight, rtol=tolerance, atol=tolerance), (
            f"{name}: flux-day and diffusers fuse differently, max |diff| "
            f"{(linear.weight - weight).abs().max().item():.3g}"
        )
