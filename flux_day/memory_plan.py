"""Which loaded components live on the GPU and which wait in host memory: a pure decision on bytes.

Nothing here touches a device: the engine measures its modules with `module_bytes` (and the fp8
copies it has not made yet with their expected size), asks `plan_memory` for a `MemoryPlan`, logs
`format_plan(plan)` and moves modules accordingly (`residency.Residency`). The rules that decide a
move (`visit`) and where a LoRA's pristine copy goes (`pristine_site`) live here too, so the
simulator (`memory_sim`) and the engine follow the same ones. Keeping the decision pure keeps it
testable for any card without one.

The GPU budget is `device_bytes - reserve_bytes`. Offloaded components share one swap slot, as big
as the largest of them: the engine keeps at most one offloaded component on the GPU at a time
(bring it in, run, send it back before the next one comes; keeping the last one until another is
needed is fine), so peak use is resident + slot + reserve <= device, always.

Rule 1, servability first: a component that fits the budget alone must stay runnable, so one goes
resident only if the largest other non-resident runnable component still fits beside it. A server
that can run every model slowly beats one that runs half of them fast; e.g. a full-precision
transformer kept swappable is what lets go_fast=False still mean the original weights.

Rule 2, then by how much each byte saves, walking `priorities` greedily (unknown names go last):
CLIP, the VAE and the safety models (small, every request), the T5 (every request; last of the
shared, it is large and runs once per request where a transformer runs every step), then dev's
full-precision transformer (the default request: dev, go_fast off, must never wait for a move),
dev's fp8 copy, then schnell's. An offloaded master is never written: go_fast LoRAs are computed
from its pristine host copy on the GPU, layer by layer, into the fp8 copy that runs.

Whatever GPU room is left after the resident set, the slot and the reserve is for LoRAs' pristine
copies (`pristine_bytes`); copies beyond it go to pinned host memory.

Pinned host memory (an offloaded component's home copy, LoRAs' host pristine copies) is laid out by
`pinned_layout`: PyTorch's pinned allocator rounds every allocation up to a power of two, so tensors
are packed into power-of-two chunks, and what is pinned stays within a few percent of the bytes.

So (cards as torch reports them, 10 GiB reserve): 141 GB holds everything resident with ~57 GB
for pristine copies; 80 GB keeps the encoders, VAE, dev in full precision and dev's fp8 copy
resident and swaps schnell's two transformers through one 23.8 GB slot; 48 GB keeps the encoders
and VAE and swaps every transformer; 24 GB keeps CLIP, the VAE and the safety models, swaps T5 and
the fp8 transformers through one 11.9 GB slot, and the full-precision ones are cpu-only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, NamedTuple

from flux_day.components import CLIP, SAFETY, T5, VAE, transformer_component

if TYPE_CHECKING:
    import torch

Placement = Literal["resident", "offloaded", "cpu-only"]
Site = Literal["device", "host"]

GIB: Final = 2**30
PINNED_CHUNK: Final = 2**28  # 256 MiB: see `pinned_layout`
PINNED_ALIGN: Final = 512  # every pinned tensor starts on a 512-byte boundary (DMA- and dtype-aligned)
DEFAULT_RESERVE: Final = 10 * GIB  # activations of a 1440x1440 denoise and the VAE decode

DEFAULT_PRIORITY: Final = (
    CLIP,
    VAE,
    SAFETY,  # the CompVis checker and Falconsai classifier: small, and run on every output
    T5,
    transformer_component("dev", fp8=False),  # the default request: never moved once it is in
    transformer_component("dev", fp8=True),
    transformer_component("schnell", fp8=True),
    transformer_component("schnell", fp8=False),
)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really holds: a subclass (torchao fp8) is the sum of its inner tensors, since
    its own `element_size()` reports the dtype it stands in for (an fp8 weight would count 2-4x)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None:
        return tensor.numel() * tensor.element_size()
    names, _ = flatten()
    return sum(tensor_bytes(inner) for name in names if (inner := getattr(tensor, name)) is not None)


def module_bytes(module: torch.nn.Module) -> int:
    """Parameters plus buffers, each shared tensor counted once (`parameters()` deduplicates)."""
    return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))


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
        """The most GPU memory the plan ever asks for: resident set, one swapped-in component, reserve,
        and the room it leaves to LoRAs' pristine copies."""
        return self.total("resident") + self.swap_bytes + self.reserve_bytes + self.pristine_bytes

    @property
    def pristine_bytes(self) -> int:
        """GPU room left for LoRAs' pristine copies (the rest go to pinned host memory)."""
        if self.device_bytes is None:
            return 0
        budget = self.device_bytes - self.reserve_bytes
        return max(0, budget - self.total("resident") - self.swap_bytes)


def visit(plan: MemoryPlan, visitor: str | None, name: str) -> str | None:
    """The component to send back to host memory so `name` can run on the GPU (None: no move).

    Resident and cpu-only components never move; an offloaded one takes the plan's single slot and
    keeps it until another offloaded component needs it, so a stream of one kind of request moves
    nothing after the first.
    """
    if plan[name] != "offloaded" or name == visitor:
        return None
    return visitor


def pristine_site(plan: MemoryPlan, used_device_bytes: int, nbytes: int) -> Site:
    """Where a LoRA's pristine copy of a GPU weight goes: the plan's room on the device while it
    lasts (first touched, first placed), else pinned host memory, read over PCIe when restoring."""
    if plan.device_bytes is None or used_device_bytes + nbytes <= plan.pristine_bytes:
        return "device"
    return "host"


class PinnedLayout(NamedTuple):
    """Where tensors go in pinned host memory: the chunk sizes (each a power of two) and, per tensor in
    the order given, its (chunk index, byte offset)."""

    chunks: tuple[int, ...]
    places: tuple[tuple[int, int], ...]

    @property
    def pinned_bytes(self) -> int:
        return sum(self.chunks)


def pinned_layout(
    sizes: Sequence[int], chunk_bytes: int = PINNED_CHUNK, align: int = PINNED_ALIGN
) -> PinnedLayout:
    """Pack tensors of `sizes` bytes into pinned chunks whose sizes are powers of two, so the pinned
    allocator (`CachingHostAllocator`, which rounds each allocation up to one) adds nothing to them.

    First fit, largest first, into `chunk_bytes` chunks (a tensor larger than that gets a chunk of its
    own power of two, whose rest smaller tensors fill); then every chunk shrinks to the power of two
    its contents need, so only a partly filled chunk (in practice the last) rounds up. FLUX.1 dev's
    transformer (1160 tensors, 23.80 GB in bf16, the largest a double block's 113 MB AdaLN linear)
    takes 24.19 GB in 256 MiB chunks (+1.6%, tails too short for the next tensor), its fp8 copy 11.92
    GB takes 12.08 GB (+1.4%); pinned tensor by tensor they would take 1.56x.
    """
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
    """Place each component `resident` (on the GPU), `offloaded` (host memory, brought in when a
    request needs it) or `cpu-only` (bigger than the GPU can ever take beside the reserve), by the
    rules of this module's docstring. Nothing is ever dropped: every component is held somewhere."""
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
    offloaded = [n for n in runnable if n not in resident]

    def placement(name: str) -> Placement:
        return "resident" if name in resident else "offloaded" if name in offloaded else "cpu-only"

    return MemoryPlan(
        tuple(Component(n, components[n], placement(n)) for n in order),
        device_bytes,
        reserve_bytes,
        max((components[n] for n in offloaded), default=0),
    )


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
