"""A model (not the engine) of what a memory plan costs per request: bytes moved, where arithmetic runs.

A pure model of the engine's policies on byte counts, for any card, with no GPU: one visitor, which
leaves when another offloaded component comes; the plan's room for pristine copies (the room fills,
the rest is host memory); the engine's order (encoders, then VAE and transformer, then the LoRAs fused
into what runs, then safety). LoRAs are modelled as covering every linear of the transformer (the
worst case, and what ai-toolkit trains by default); a switch restores the old LoRA's weights from their
pristine copies and writes the new one's.

    python scripts/benchmark.py plan        # the table for 24, 48, 80 and 141 GB cards
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from flux_day.memory_plan import MemoryPlan
from flux_day.models import CLIP, SAFETY, T5, VAE, transformer_component

GIB: Final = 2**30
# Total memory as torch reports it for common cards of each size.
CARDS: Final[dict[str, int]] = {
    "24 GB (RTX 4090)": int(23.64 * GIB),
    "48 GB (RTX A6000)": int(47.54 * GIB),
    "80 GB (H100)": int(79.19 * GIB),
    "141 GB (H200)": int(139.8 * GIB),
}


@dataclass(frozen=True)
class SimRequest:
    """One request of a mix: which model, go_fast or not, and which LoRA (None: none)."""

    label: str
    model: str = "dev"
    fp8: bool = False
    lora: str | None = None


DEFAULT_MIX: Final = (
    SimRequest("default (dev, go_fast off)"),
    SimRequest("default again"),
    SimRequest("go_fast", fp8=True),
    SimRequest("go_fast + LoRA A", fp8=True, lora="A"),
    SimRequest("go_fast + switch to LoRA B", fp8=True, lora="B"),
    SimRequest("LoRA B, full precision", lora="B"),
    SimRequest("schnell", model="schnell"),
    SimRequest("schnell go_fast + LoRA A", model="schnell", fp8=True, lora="A"),
    SimRequest("default", lora=None),
)


@dataclass(frozen=True)
class SimStep:
    """What one request cost: bytes host -> GPU and GPU -> host, LoRA bytes written, where the LoRA
    arithmetic and the denoising ran, and which components moved."""

    request: SimRequest
    to_gpu: int
    to_host: int
    lora_written: int
    lora_site: str  # "GPU", "CPU" or "-" (nothing to fuse)
    denoise_site: str
    moved: tuple[str, ...]
    refused: bool = False


@dataclass
class _State:
    visitor: str | None = None
    built: set[str] = field(default_factory=set)
    fused: dict[str, str | None] = field(default_factory=dict)  # group -> LoRA fused there
    host_pristine: dict[str, int] = field(default_factory=dict)  # group -> its pristine bytes in host memory
    device_pristine: int = 0


def simulate(
    plan: MemoryPlan, requests: Sequence[SimRequest], fp8_built: Sequence[str] = ()
) -> list[SimStep]:
    """Run `requests` in order against `plan`; fp8 copies are made on first use unless in `fp8_built`."""
    sizes = {c.name: c.bytes for c in plan.components}
    state = _State(built={name for name in sizes if not name.endswith("-fp8")} | set(fp8_built))
    return [_one(plan, sizes, state, request) for request in requests]


def _one(plan: MemoryPlan, sizes: Mapping[str, int], state: _State, request: SimRequest) -> SimStep:
    transformer = transformer_component(request.model, request.fp8)
    if plan.device_bytes is not None and plan[transformer] == "cpu-only":
        return SimStep(request, 0, 0, 0, "-", "-", (), refused=True)
    to_gpu = to_host = 0
    moved: list[str] = []
    master = transformer_component(request.model, fp8=False)

    def on_gpu(name: str) -> bool:
        return plan.device_bytes is None or plan[name] == "resident" or name == state.visitor

    def need(name: str) -> None:
        nonlocal to_gpu, to_host
        if plan.device_bytes is None or plan[name] != "offloaded" or name == state.visitor:
            if name not in state.built:  # a resident fp8 copy, made on first use on the GPU
                to_gpu += 0 if on_gpu(master) else sizes[master]
                state.built.add(name)
            return
        leaving = state.visitor
        if leaving is not None:
            state.fused.pop(leaving, None)  # its GPU copy is dropped; the home copy is pristine
        state.visitor = None
        if name in state.built:
            to_gpu += sizes[name]
        else:  # built on the GPU from the master (streamed if at home), then given a home copy
            to_gpu += 0 if on_gpu(master) else sizes[master]
            to_host += sizes[name]
            state.built.add(name)
        state.visitor = name
        moved.append(name)

    for name in (CLIP, T5, VAE, transformer):
        need(name)
    written = 0
    if state.fused.get(transformer) != request.lora:
        written, pristine_reads, pristine_writes = _switch(plan, sizes, state, transformer, request)
        to_gpu += pristine_reads
        to_host += pristine_writes
        state.fused[transformer] = request.lora
    need(SAFETY)
    site = "GPU" if plan.device_bytes is not None else "CPU"
    return SimStep(request, to_gpu, to_host, written, site if written else "-", site, tuple(moved))


def _switch(
    plan: MemoryPlan, sizes: Mapping[str, int], state: _State, group: str, request: SimRequest
) -> tuple[int, int, int]:
    """Bytes written into `group`, read over PCIe from pinned host copies, and copied to host."""
    size = sizes[group]
    reads = writes = 0
    home = plan.device_bytes is not None and plan[group] == "offloaded"
    if group not in state.host_pristine and not home:  # first touch: pristine copies made
        # The engine places them weight by weight (`pristine_site`): the plan's room fills, the rest
        # goes to host memory. A CPU engine keeps them all beside the weights.
        room = plan.pristine_bytes - state.device_pristine if plan.device_bytes is not None else size
        on_device = min(size, max(0, room))
        state.host_pristine[group] = size - on_device
        state.device_pristine += on_device
        writes += size - on_device
    host_pristine = size if home else state.host_pristine.get(group, 0)
    if state.fused.get(group) is not None:
        reads += host_pristine  # the old LoRA's weights restored from host copies
    if request.lora is not None:
        if request.fp8:  # computed from the master's pristine weights
            master = transformer_component(request.model, fp8=False)
            if plan.device_bytes is not None and plan[master] != "resident":
                reads += sizes[master]
            elif state.fused.get(master) is not None:
                reads += state.host_pristine.get(master, 0)
        else:
            reads += host_pristine
    return size, reads, writes


def format_simulation(card: str, plan: MemoryPlan, steps: Sequence[SimStep]) -> str:
    """One table for a card: a row per request."""

    def gb(size: int) -> str:
        return f"{size / 1e9:.1f}"

    lines = [
        f"{card}: resident {', '.join(plan.names('resident')) or '-'}; offloaded "
        f"{', '.join(plan.names('offloaded')) or '-'}; cpu-only {', '.join(plan.names('cpu-only')) or '-'}; "
        f"{gb(plan.pristine_bytes)} GB of GPU room for LoRA pristine copies",
        f"  {'request':<30} {'to GPU GB':>9} {'to host GB':>10} {'LoRA GB written':>15} "
        f"{'LoRA math':>9} {'denoise':>7}  moved",
    ]
    for step in steps:
        if step.refused:
            lines.append(f"  {step.request.label:<30} refused: its transformer does not fit this card")
            continue
        lines.append(
            f"  {step.request.label:<30} {gb(step.to_gpu):>9} {gb(step.to_host):>10} "
            f"{gb(step.lora_written):>15} {step.lora_site:>9} {step.denoise_site:>7}  "
            f"{', '.join(step.moved) or '-'}"
        )
    return "\n".join(lines)


def card_offloading_schnell(sizes: Mapping[str, int]) -> int:
    """A card size (no reserve) that keeps the shared components and dev in both precisions resident
    and swaps schnell's transformers through one slot, as an 80 GB card does at FLUX.1's real size:
    for CPU runs of the same plan on small models (the GPU proof's --tiny, tests)."""
    resident = sum(sizes[name] for name in (CLIP, T5, VAE, SAFETY)) + sizes["dev-full"] + sizes["dev-fp8"]
    return resident + max(sizes["schnell-full"], sizes["schnell-fp8"]) + 1024
