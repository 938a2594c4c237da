"""Which loaded components live on the GPU and which wait in CPU RAM: a pure decision on byte counts.

Nothing here touches a device: the engine measures its modules with `module_bytes`, asks `plan_memory`
for a `MemoryPlan`, logs `format_plan(plan)` and moves modules accordingly. Keeping the decision pure
keeps it testable for any card without one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, NamedTuple

if TYPE_CHECKING:
    import torch

Placement = Literal["resident", "offloaded", "cpu-only"]

GIB: Final = 2**30
DEFAULT_RESERVE: Final = 10 * GIB  # activations of a 1440x1440 denoise and the VAE decode
DEFAULT_PRIORITY: Final = (
    "clip",
    "vae",
    "safety",  # the CompVis checker and Falconsai classifier: small, and run on every output
    "t5",
    "dev-fp8",
    "schnell-fp8",
    "dev-bf16",
    "schnell-bf16",
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
        """The most GPU memory the plan ever asks for: resident set, one swapped-in component, reserve."""
        return self.total("resident") + self.swap_bytes + self.reserve_bytes


def plan_memory(
    components: Mapping[str, int],
    device_bytes: int | None,
    reserve_bytes: int = DEFAULT_RESERVE,
    priorities: Sequence[str] = DEFAULT_PRIORITY,
) -> MemoryPlan:
    """Place each component `resident` (on the GPU), `offloaded` (CPU RAM, swapped in when a request
    needs it) or `cpu-only` (CPU RAM; bigger than the GPU can ever take beside the reserve). Nothing is
    ever dropped: every component is held somewhere.

    The GPU budget is `device_bytes - reserve_bytes`. Offloaded components share one swap slot, as big
    as the largest of them: the engine keeps at most one offloaded component on the GPU at a time
    (bring it in, run, send it back before the next one comes; keeping the last one until another is
    needed is fine), so peak use is resident + slot + reserve <= device, always.

    Rule 1, servability first: a component that fits the budget alone must stay runnable, so one goes
    resident only if the largest other non-resident runnable component still fits beside it. A server
    that can run every model slowly beats one that runs half of them fast; e.g. a bf16 transformer kept
    swappable is what lets go_fast=False still mean the original bf16 weights.

    Rule 2, then by how much each byte saves, walking `priorities` greedily (unknown names go last):
    CLIP and the VAE (tiny, every request), the T5 (every request; last of the shared, it is large and
    runs once per request where a transformer runs every step), then the fp8 transformers before the
    bf16 ones: half the bytes for the same model, so twice the requests served per GB, and go_fast is
    the latency-sensitive path a swap would undo. dev before schnell: dev is the default model. The
    bf16 master of a model whose fp8 copy is resident may stay in CPU RAM: LoRAs are fused into it
    there and only the touched layers re-quantized into the fp8 copy.

    So (decimal GB, 10 GiB reserve): 141 GB holds everything resident; 80 GB keeps encoders, VAE and
    both fp8 transformers resident and swaps the bf16 ones; 48 GB keeps the encoders and VAE and swaps
    every transformer; 24 GB keeps CLIP and the VAE, swaps T5 and the fp8 transformers through one
    11.9 GB slot, and the bf16 transformers are cpu-only: go_fast=False cannot run in bf16 there.
    """
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
            f" + {gb(plan.reserve_bytes)} reserve = {gb(plan.peak_bytes)} of {gb(plan.device_bytes)} GB;"
            f" CPU RAM {gb(held_on_cpu)} GB"
        )
    return "\n".join(lines)
