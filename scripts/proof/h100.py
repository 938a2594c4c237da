"""The 80 GB card: the H100's layout (encoders, VAE and dev resident; schnell's two transformers swap
through one slot), and the request sequence that once leaked a LoRA into the next user's image.

On CUDA the process is capped to the H100's total memory (`memory_model.CARDS`, 79.2 GiB as torch
reports it) before the engine's setup, and the plan is made for that card. On a CPU the card is
`memory_model.card_offloading_schnell` of the tiny models: the same plan, the same moves. Sequence:
schnell go_fast before any LoRA (the reference), `schnell go_fast + LoRA A`, `schnell, go_fast=false`
(the fp8 copy goes home with LoRA A fused), `schnell go_fast, no LoRA`: that image must be the
reference's, and the fp8 copy sent home must hold nothing on the device (every inner tensor of its
fp8 weights is its home copy; on CUDA, memory_allocated drops by its size as it leaves).
"""

from __future__ import annotations

import time
from typing import Any

from scripts.proof.engine_run import Run, met

PHASE = "80 GB card (H100)"
SEQUENCE_RANK = 4  # enough to change every image; a small data: URI at full size


def capped_card(run: Run) -> Any:
    """The H100 as a GpuBudget; on CUDA the process capped to its memory from now on."""
    import torch

    from flux_day.memory_plan import GpuBudget
    from flux_day.pipelines import component_sizes
    from scripts.bench.memory_model import CARDS, card_offloading_schnell

    if not run.cuda:
        return GpuBudget(card_offloading_schnell(component_sizes(run.models, run.safety)), 0)
    total = CARDS["80 GB (H100)"]
    fraction = min(1.0, total / torch.cuda.get_device_properties(0).total_memory)
    torch.cuda.set_per_process_memory_fraction(fraction)
    held = torch.cuda.memory_allocated() / 2**30
    run.proof.row(
        PHASE,
        "process capped",
        f"{total / 2**30:.1f} GiB",
        f"{fraction:.3f} of this card; {held:.1f} GiB held",
    )
    return GpuBudget(total)


def lora_uri(run: Run, model: str, seed: int) -> str:
    """A random LoRA on every linear of `model`'s transformer, as a data: URI (bf16 on CUDA)."""
    import torch

    from scripts.bench.lora_switch import lora_state_dict
    from tests.harness.lora_files import data_uri, to_bytes

    master = run.models.transformers[model]
    linears = {n: m for n, m in master.named_modules() if isinstance(m, torch.nn.Linear)}
    state = lora_state_dict(linears, SEQUENCE_RANK, seed)
    return data_uri(to_bytes({k: v.to(run.dtype) if v.ndim else v for k, v in state.items()}))


def card_80(run: Run) -> None:
    """The phase: the H100's card (capped first on CUDA), its engine, its placement, the sequence."""
    import torch

    run.drop_engine()
    torch.compiler.reset()  # compiled graphs may hold the last engine's fp8 copies
    try:
        run.start_engine(PHASE, compile=False, card=capped_card(run))
        placement = ", ".join(f"{c.name}={c.placement}" for c in run.engine.plan.components)
        run.proof.row(PHASE, "placement", "see note", placement)
        leak_sequence(run)
    finally:
        if run.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)


def leak_sequence(run: Run) -> None:
    """Defect 1's sequence, each step timed; two checks as rows."""
    import numpy as np

    engine, side = run.engine, run.scale.small_side
    uri = lora_uri(run, "schnell", seed=1)

    def image(step: str, go_fast: bool, **loras: Any) -> np.ndarray:
        request = run.request("schnell", go_fast, side, disable_safety_checker=True, **loras)
        begun = time.perf_counter()
        generated = engine.generate(request).images[0]
        run.sync()
        run.proof.row(PHASE, step, f"{time.perf_counter() - begun:.2f} s")
        return np.asarray(generated)

    reference = image("schnell go_fast, no LoRA (reference; fp8 made)", True)
    styled = image("1. schnell go_fast + LoRA A", True, replicate_weights=uri)
    run.proof.row(
        PHASE,
        "LoRA A changes the image",
        "yes" if not np.array_equal(styled, reference) else "NO",
        "else the leak check below proves nothing",
    )
    fp8 = engine.residency.modules["schnell-fp8"]
    left = watch_leaving(run)
    image("2. schnell, go_fast=false (fp8 copy sent home)", False)
    report_sent_home(run, fp8, left)
    third = image("3. schnell go_fast, no LoRA", True)
    same = np.array_equal(third, reference)
    run.proof.row(
        PHASE, "3rd image = the reference (no LoRA leaked)", "yes" if same else "NO: LoRA A leaked", met(same)
    )


def watch_leaving(run: Run) -> dict[str, int]:
    """Device memory allocated just before the next request and as each module leaves the slot."""
    import torch

    residency = run.engine.residency
    told = residency.on_leave
    left: dict[str, int] = {}
    if run.cuda:
        run.sync()
        left["before"] = torch.cuda.memory_allocated()

    def on_leave(name: str) -> None:
        if run.cuda:
            left[name] = torch.cuda.memory_allocated()
        told(name)

    residency.on_leave = on_leave
    return left


def _held_at_home(tensor: Any, home: Any) -> bool:
    """Every inner tensor of `tensor` (fp8 `qdata` and `scale`, or the tensor itself) is `home`'s."""
    from flux_day.residency import inner_tensors

    homes = inner_tensors(home)
    return all(part.data_ptr() == homes[key].data_ptr() for key, part in inner_tensors(tensor).items())


def report_sent_home(run: Run, fp8: Any, left: dict[str, int]) -> None:
    """Rows: the fp8 copy's inner tensors are its home copies; on CUDA, the memory it freed leaving."""
    from flux_day.residency import module_bytes

    residency = run.engine.residency
    weights = [t for t in fp8.parameters() if residency.home(t) is not None]
    at_home = sum(_held_at_home(t, residency.home(t)) for t in weights)
    run.proof.row(
        PHASE,
        "fp8 copy sent home: weights wholly in their home copy",
        f"{at_home} of {len(weights)}",
        met(bool(weights) and at_home == len(weights)),
    )
    if not run.cuda:
        return
    size = module_bytes(fp8)
    freed = left["before"] - left.get("schnell-fp8", left["before"])
    run.proof.row(
        PHASE,
        "fp8 copy sent home: GPU memory freed as it left",
        f"{freed / 1e9:.1f} of {size / 1e9:.1f} GB",
        met(freed >= 0.9 * size),
    )
