"""`benchmark.py lora-switch`: replacing one fused LoRA by another, flux-day against diffusers and torchao.

Two random LoRAs (A, B) on every linear of the dev transformer, PEFT layout with an alpha per module
(alpha/rank = 0.5, so alpha handling is compared too), per rank asked for. The same tensors go to
flux-day as safetensors bytes and to diffusers as a state dict. Variants, interleaved per repeat:

- flux-day warm switch A <-> B in full precision, both LoRAs already parsed;
- flux-day cold switch (parsed again from bytes in memory; the download is excluded): the engine's LoRA
  manager is given the files' bytes (`LoraManager(lora_bytes=...)` sharing the engine's fuser) and
  forgets what it parsed before each cold switch (`forget_parsed`), untimed;
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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WARM, COLD = "flux-day warm switch", "flux-day cold switch (parse, no download)"
DIFFUSERS = "diffusers unfuse+unload+load+fuse"
GO_FAST, QUANTIZE = "flux-day go_fast warm switch", "torchao quantize_ whole transformer"


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


def use_in_memory_loras(engine: Any, state_dicts: dict, reads: dict | None = None) -> dict:
    """Give `engine` a LoRA manager whose transfer is a dict lookup (a cache miss then costs exactly
    what `activate` does once the bytes have arrived), counting reads in `reads["cold"]`, and return a
    request per LoRA label."""
    from flux_day.loras.manager import LoraManager
    from flux_day.loras.refs import LoraRequest
    from tests.harness.lora_files import data_uri, to_bytes

    blobs = {label: to_bytes(state) for label, state in state_dicts.items()}
    by_source = {data_uri(blob): blob for blob in blobs.values()}
    counts = reads if reads is not None else {"cold": 0}

    def lora_bytes(lora: LoraRequest) -> bytes:
        counts["cold"] += 1
        return by_source[lora.ref.location]

    engine.loras.release()
    engine.loras = LoraManager(engine.settings, engine.loras.fuser, lora_bytes=lora_bytes)
    return {
        label: [LoraRequest.parse("replicate_weights", data_uri(blob), 1.0)] for label, blob in blobs.items()
    }


def pristine_bytes(engine: Any, group: str) -> int:
    """Bytes of the pristine copies the fuser keeps for `group`'s weights (an offloaded module's home
    copy is not counted: it exists anyway)."""
    from flux_day.residency import tensor_bytes

    fuser = engine.loras.fuser
    return sum(
        tensor_bytes(tensor)
        for param, record in fuser.records.items()
        if record.group == group and engine.residency.home(param) is None
        for tensor in record.pristine.values()
    )


def switch_table(title: str, rows: dict[str, list[float]], memory: dict[str, str], baseline: str) -> None:
    """Median/min/max in ms, the pristine copies each variant keeps, and the median over the baseline's."""
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
    """One table per rank in `args.rank`, on the dev transformer of `args.weights`."""
    from diffusers import FluxPipeline
    from diffusers.utils import logging as diffusers_logging

    from flux_day.config import Settings
    from flux_day.engine import Engine
    from flux_day.weights.manifest import DEV_FOLDER

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
    transformer = engine.models.transformers["dev"]
    pristine = {k: v.clone() for k, v in transformer.state_dict().items()}
    diffusers_pipe = FluxPipeline.from_pretrained(
        args.weights / DEV_FOLDER, dtype=engine.dtype, text_encoder_2=None, vae=None
    )
    diffusers_pipe.to(engine.device)
    for rank in args.rank:
        one_rank(args, engine, diffusers_pipe, rank, pristine)


@dataclass
class Variant:
    """One timed switch, and what runs untimed before each call of it."""

    switch: Callable[[], None]
    prepare: Callable[[], None] = lambda: None


class Switches:
    """The variants of one rank: flux-day's switches (full precision, cold, go_fast) between LoRAs A and
    B, diffusers' own on its pipeline, and torchao quantizing a fresh copy of the whole transformer."""

    def __init__(self, engine: Any, diffusers_pipe: Any, rank: int) -> None:
        import torch

        self.engine, self.diffusers_pipe, self.model = engine, diffusers_pipe, "dev"
        self.components = engine.lora_components(self.model)
        self.fp8 = engine.pipeline(self.model, "txt2img", fp8=True).transformer
        self.transformer = self.components["transformer"]
        self.linears = {n: m for n, m in self.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
        self.sync = torch.cuda.synchronize if engine.device.type == "cuda" else lambda: None
        self.state_dicts = {
            label: lora_state_dict(self.linears, rank, seed) for seed, label in ((1, "A"), (2, "B"))
        }
        self.reads = {"cold": 0}
        self.requests = use_in_memory_loras(engine, self.state_dicts, self.reads)
        self.fused = {"full": "none", "fast": "none", "diffusers": "none"}
        self.fresh: list[Any] = []

    def variants(self) -> dict[str, Variant]:
        """Every variant by its row name, in table order."""
        return {
            WARM: Variant(self.flux_day(None, "full"), self.parse_both),
            COLD: Variant(self.flux_day(None, "full"), self.engine.loras.forget_parsed),
            DIFFUSERS: Variant(self.diffusers_switch),
            GO_FAST: Variant(self.flux_day(self.fp8, "fast"), self.parse_both),
            QUANTIZE: Variant(self.whole_quantize, self.fresh_copy),
        }

    def flux_day(self, fp8: Any, which: str) -> Callable[[], None]:
        """flux-day's switch to the other LoRA, in full precision or (with `fp8`) go_fast."""

        def switch() -> None:
            label = other(self.fused[which])
            written = self.engine.loras.activate(
                self.model, self.components, self.requests[label], go_fast=which == "fast", fp8=fp8
            )
            self.sync()
            assert len(written) == len(self.linears), "not a full switch"
            self.fused[which] = label

        return switch

    def parse_both(self) -> None:
        """Both LoRAs parsed, as the warm variants expect them (a cold switch leaves only one)."""
        for request in self.requests.values():
            self.engine.loras.weights(request[0], self.model, self.components)

    def diffusers_switch(self) -> None:
        label = other(self.fused["diffusers"])
        self.diffusers_pipe.unfuse_lora()
        self.diffusers_pipe.unload_lora_weights()
        self.diffusers_pipe.load_lora_weights(dict(self.state_dicts[label]), adapter_name=label)
        self.diffusers_pipe.fuse_lora()
        self.sync()
        self.fused["diffusers"] = label

    def fresh_copy(self) -> None:
        self.fresh.append(copy.deepcopy(self.transformer))

    def whole_quantize(self) -> None:
        from torchao.quantization import quantize_

        quantize_(self.fresh.pop(), self.engine.recipe.fp8)
        self.sync()


def other(current: str) -> str:
    return "B" if current == "A" else "A"


def time_variants(switches: Switches, repeats: int) -> dict[str, list[float]]:
    """Two untimed calls of each variant, then `repeats` interleaved rounds; LoRA files must be read
    inside a timing only by the cold switch, once per call."""
    variants = switches.variants()
    for variant in variants.values():
        for _ in range(2):
            variant.prepare()
            variant.switch()
    results: dict[str, list[float]] = {name: [] for name in variants}
    reads_timed = dict.fromkeys(variants, 0)
    gc.collect()
    gc.freeze()  # loaded models are long-lived: no full collection rescanning them inside a timing
    try:
        for _ in range(repeats):
            for name, variant in variants.items():
                variant.prepare()  # untimed
                reads = switches.reads["cold"]
                started = time.perf_counter()
                variant.switch()
                results[name].append(time.perf_counter() - started)
                reads_timed[name] += switches.reads["cold"] - reads
    finally:
        gc.unfreeze()
    expected = {name: repeats if name == COLD else 0 for name in variants}
    assert reads_timed == expected, f"LoRA files read inside timings: {reads_timed}"
    return results


def one_rank(args: argparse.Namespace, engine: Any, diffusers_pipe: Any, rank: int, pristine: dict) -> None:
    """One table: every variant switching between two random LoRAs of `rank`, interleaved."""
    import torch

    switches = Switches(engine, diffusers_pipe, rank)
    results = time_variants(switches, args.repeats)
    check_against_diffusers(switches)
    engine.loras.release()
    for key, value in switches.transformer.state_dict().items():
        assert torch.equal(value, pristine[key]), f"{key} not restored bit-exactly"
    memory = {
        WARM: f"{pristine_bytes(engine, 'dev-full') / 1e9:.2f}",
        COLD: f"{pristine_bytes(engine, 'dev-full') / 1e9:.2f}",
        GO_FAST: f"{pristine_bytes(engine, 'dev-fp8') / 1e9:.2f}",
        DIFFUSERS: "0 (lossy)",
        QUANTIZE: "-",
    }
    linears = switches.linears
    parameters = sum(v.numel() for k, v in switches.state_dicts["A"].items() if not k.endswith("alpha"))
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears.values())
    switch_table(
        f"lora-switch: LoRA A <-> B on all {len(linears)} linears of the dev transformer "
        f"({weight_bytes / 1e9:.2f} GB of weights), rank {rank}, {parameters / 1e6:.1f} M LoRA "
        f"parameters, {args.repeats} repeats, {engine.device.type}/"
        f"{str(engine.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, "
        f"weights {args.weights}",
        results,
        memory,
        baseline=WARM,
    )
    speedup = statistics.median(results[DIFFUSERS]) / statistics.median(results[WARM])
    ratio = statistics.median(results[GO_FAST]) / statistics.median(results[QUANTIZE])
    print(
        f"targets: warm switch >= 5x faster than diffusers: {'met' if speedup >= 5 else 'NOT met'} "
        f"({speedup:.1f}x); go_fast switch <= 1.0x whole-model quantize_: "
        f"{'met' if ratio <= 1.0 else 'NOT met'} ({ratio:.2f}x). Fused weights match diffusers; no "
        "LoRA restores every weight bit-exactly."
    )


def check_against_diffusers(switches: Switches) -> None:
    """Apples to apples: both paths leave the same fused weights for the same LoRA."""
    import torch

    tolerance = 1e-5 if switches.engine.dtype == torch.float32 else 1e-2
    if switches.fused["full"] != switches.fused["diffusers"]:
        switches.flux_day(None, "full")()
    theirs = dict(switches.diffusers_pipe.transformer.named_modules())
    for name, linear in switches.linears.items():
        weight = getattr(theirs[name], "base_layer", theirs[name]).weight
        assert torch.allclose(linear.weight, weight, rtol=tolerance, atol=tolerance), (
            f"{name}: flux-day and diffusers fuse differently, max |diff| "
            f"{(linear.weight - weight).abs().max().item():.3g}"
        )
