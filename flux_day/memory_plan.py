"""Which components live on the GPU and which wait in host memory: a pure decision on bytes, for any card.

Offloaded components share one swap slot, so peak = resident + slot + reserve <= device. Servability
first: a component goes resident only if the largest other runnable one still fits beside it; then in
`DEFAULT_PRIORITY` order. The room left holds LoRAs' pristine copies, the rest go to pinned host memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

from flux_day.models import CLIP, SAFETY, T5, VAE

Placement = Literal["resident", "offloaded", "cpu-only"]
Site = Literal["device", "host"]

GIB: Final = 2**30
PINNED_CHUNK: Final = 2**28  # 256 MiB: see `pinned_layout`
PINNED_ALIGN: Final = 512  # every pinned tensor starts on a 512-byte boundary (DMA- and dtype-aligned)
DEFAULT_RESERVE: Final = 10 * GIB  # activations of a 1440x1440 denoise and the VAE decode

# Small and every output first; T5 last of the shared (once per request, where a transformer runs every
# step); then dev in full precision, the default request, which must never wait for a move.
DEFAULT_PRIORITY: Final = (CLIP, VAE, SAFETY, T5, "dev-full", "dev-fp8", "schnell-fp8", "schnell-full")


@dataclass(frozen=True)
class GpuBudget:
    total_bytes: int
    reserve_bytes: int = DEFAULT_RESERVE


class Component(NamedTuple):
    name: str
    bytes: int
    placement: Placement


@dataclass(frozen=True)
class MemoryPlan:
    """Every component once, in priority order; `swap_bytes` is GPU room kept free for one offloaded one."""

    components: tuple[Component, ...]
    device_bytes: int | None  # None: a CPU engine, where everything is "resident" in RAM
    reserve_bytes: int
    swap_bytes: int

    def __getitem__(self, name: str) -> Placement:
        return next(c.placement for c in self.components if c.name == name)

    def names(self, placement: Placement) -> tuple[str, ...]:
        return tuple(c.name for c in self.components if c.placement == placement)

    def total(self, placement: Placement) -> int:
        return sum(c.bytes for c in self.components if c.placement == placement)

    @property
    def peak_bytes(self) -> int:
        """The most GPU memory the plan asks for, LoRAs' pristine copies' room included."""
        return self.total("resident") + self.swap_bytes + self.reserve_bytes + self.pristine_bytes

    @property
    def pristine_bytes(self) -> int:
        if self.device_bytes is None:
            return 0
        budget = self.device_bytes - self.reserve_bytes
        return max(0, budget - self.total("resident") - self.swap_bytes)


def pristine_site(plan: MemoryPlan, used_device_bytes: int, nbytes: int) -> Site:
    """Where a LoRA's pristine copy of a GPU weight goes: the plan's room while it lasts, else host."""
    if plan.device_bytes is None or used_device_bytes + nbytes <= plan.pristine_bytes:
        return "device"
    return "host"


class PinnedLayout(NamedTuple):
    """Chunk sizes (powers of two) and, per tensor in the order given, its (chunk index, byte offset)."""

    chunks: tuple[int, ...]
    places: tuple[tuple[int, int], ...]

    @property
    def pinned_bytes(self) -> int:
        return sum(self.chunks)


def pinned_layout(
    sizes: Sequence[int], chunk_bytes: int = PINNED_CHUNK, align: int = PINNED_ALIGN
) -> PinnedLayout:
    """Pack tensors first fit, largest first, into chunks shrunk to powers of two, which the pinned
    allocator (it rounds up to one) takes as they are: dev's transformer takes +1.6%, not 1.56x."""
    if chunk_bytes & (chunk_bytes - 1) or align & (align - 1):
        raise ValueError(f"chunk_bytes ({chunk_bytes}) and align ({align}) must be powers of two")
    fills: list[int] = []
    capacities: list[int] = []
    places: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        size = -(-sizes[index] // align) * align
        chunk = next((c for c, fill in enumerate(fills) if fill + size <= capacities[c]), len(fills))
        if chunk == len(fills):
            fills.append(0)
            capacities.append(max(chunk_bytes, _power_of_two_at_least(size)))
        places[index] = (chunk, fills[chunk])
        fills[chunk] += size
    return PinnedLayout(tuple(_power_of_two_at_least(fill) for fill in fills), tuple(places))


def _power_of_two_at_least(size: int) -> int:
    return 1 << max(0, size - 1).bit_length()


def plan_memory(
    components: Mapping[str, int],
    device_bytes: int | None,
    reserve_bytes: int = DEFAULT_RESERVE,
    priorities: Sequence[str] = DEFAULT_PRIORITY,
) -> MemoryPlan:
    """Place each component `resident`, `offloaded` (visits the GPU when needed) or `cpu-only` (too big
    for the GPU beside the reserve), by the rules above."""
    if any(size < 0 for size in components.values()):
        raise ValueError(f"component sizes must be >= 0: {dict(components)}")
    order = [n for n in dict.fromkeys(priorities) if n in components]
    order += [n for n in components if n not in order]
    if device_bytes is None:
        return MemoryPlan(tuple(Component(n, components[n], "resident") for n in order), None, 0, 0)
    budget = device_bytes - reserve_bytes
    runnable = [n for n in order if components[n] <= budget]
    resident: set[str] = set()
    used = 0
    for name in runnable:
        others = (components[n] for n in runnable if n != name and n not in resident)
        if used + components[name] + max(others, default=0) <= budget:
            resident.add(name)
            used += components[name]
    placed: dict[str, Placement] = {n: "resident" if n in resident else "offloaded" for n in runnable}
    swap = max((components[n] for n in runnable if n not in resident), default=0)
    placements = tuple(Component(n, components[n], placed.get(n, "cpu-only")) for n in order)
    return MemoryPlan(placements, device_bytes, reserve_bytes, swap)


def format_plan(plan: MemoryPlan) -> str:
    """One block for the log: a row per component, then what the GPU and CPU RAM hold in total."""

    def gb(size: int) -> str:
        return f"{size / 1e9:.2f}"

    width = max([len("component"), *(len(c.name) for c in plan.components)])
    lines = [f"{'component':<{width}}  {'GB':>7}  placement"]
    lines += [f"{c.name:<{width}}  {gb(c.bytes):>7}  {c.placement}" for c in plan.components]
    held_on_cpu = plan.total("offloaded") + plan.total("cpu-only")
    if plan.device_bytes is None:
        lines.append(f"total: {gb(plan.total('resident'))} GB on the CPU (no GPU, nothing to plan)")
    else:
        lines.append(
            f"total: GPU {gb(plan.total('resident'))} resident + {gb(plan.swap_bytes)} swap slot"
            f" + {gb(plan.reserve_bytes)} reserve + {gb(plan.pristine_bytes)} LoRA pristine copies"
            f" = {gb(plan.peak_bytes)} of {gb(plan.device_bytes)} GB; CPU RAM {gb(held_on_cpu)} GB"
        )
    return "\n".join(lines)
