"""`benchmark.py plan`: the memory plan of FLUX.1 at its real size for 24, 48, 80 and 141 GB cards, and
what each request of a mix moves between host and GPU and where its LoRA arithmetic runs
(`scripts.bench.memory_model`). Nothing is allocated: component sizes come from models on the meta device."""

from __future__ import annotations

import argparse


def full_size_components() -> dict[str, int]:
    """Bytes of every component of the real FLUX.1 (bf16; fp8 copies as torchao will hold them),
    measured on models built on the meta device from the full-size profile: nothing allocated."""
    import torch

    from flux_day.pipelines import component_sizes
    from scripts.random_weights.models import PROFILES, build_models

    return component_sizes(*build_models(PROFILES["full"], torch.device("meta"), torch.bfloat16))


def plan(args: argparse.Namespace) -> None:
    """The memory plan and, per request of a mix, bytes moved and where the arithmetic runs."""
    from flux_day.memory_plan import format_plan, plan_memory
    from scripts.bench.memory_model import CARDS, DEFAULT_MIX, format_simulation, simulate

    sizes = full_size_components()
    print("plan: FLUX.1 at its real size (bf16; fp8 copies made on first use), 10 GiB activation reserve")
    print("      LoRAs cover every linear of the transformer (the worst case); one row per request, in order")
    for card, total in CARDS.items():
        if args.card and not card.startswith(f"{args.card} "):
            continue
        memory = plan_memory(sizes, total)
        print(f"\n{format_plan(memory)}")
        print(format_simulation(card, memory, simulate(memory, DEFAULT_MIX)))
