"""Exact fuse and restore of LoRA deltas, one pass per weight, into whatever a request runs on.

A `Slot` is one weight a LoRA may change: a full-precision linear (the master transformer, CLIP), or
an fp8 linear of a go_fast transformer, whose value is `quantize(master + LoRA)`. The first time a
weight is touched a pristine copy of it is kept (where the memory plan allows, see `PristineStore`);
every fuse then writes the weight once, straight from that copy:

    weight = pristine + Σ scale_i · (alpha/rank)_i · up_i @ down_i

as one `addmm` over the LoRAs' factors stacked along the rank (no zero buffer, no full-size product),
and every restore copies the pristine tensor back, so base → A → B → A+B → none ends bit-identical
to the start. LoRAs are stacked in a fixed order, so main + extra gives the bytes of extra + main.

An fp8 slot never touches its master: its value is computed from the master's pristine weight into
one layer-sized scratch tensor on the fp8 layer's device, quantized, and copied into the fp8 tensors
in place (so a compiled graph keeps its inputs). An offloaded master therefore stays pristine in host
memory and only the touched layers travel to the GPU; no LoRA arithmetic runs on the host when a GPU
serves.

Bias updates (ComfyUI's `diff_b`) are dense deltas of a bias parameter and take the same path. A
fused parameter its dtype cannot hold (a sum past fp16's 65504 or bf16's ~3.4e38 is infinite) is
refused, restoring everything.

`WeightFuser` is the one record of what is fused: `apply` returns a `FusedState` naming every weight
that differs from pristine and what it holds; it writes only the weights whose content changes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from flux_day.loras.delta_math import ScaledDelta, fused_weight, inner_tensors
from flux_day.loras.pristine import PristineStore
from flux_day.residency import set_storage

log = logging.getLogger(__name__)

Content = tuple[tuple[str, float], ...]  # (LoRA digest, scale) pairs fused into a weight, sorted
DIRTY: Content = (("<being written>", float("nan")),)  # a write under way: restored on any failure


class UnrepresentableWeight(ArithmeticError):
    """A fused parameter holds NaN or infinity: the sum is beyond what its dtype can hold."""

    def __init__(self, param: nn.Parameter, orders: tuple[str, ...]) -> None:
        super().__init__(f"a fused {param.dtype} parameter is not finite")
        self.param = param
        self.orders = orders  # the `order` of each delta summed into it (which LoRAs)


@dataclass(frozen=True, eq=False)
class Slot:
    """A weight LoRAs write: `param`, in group `group` (one transformer, or CLIP) under `name`.

    `source` is the full-precision master whose pristine value LoRAs are added to when `param` is not
    itself that master (an fp8 layer); `quantize` then turns the fused value into `param`'s format.
    """

    name: str
    group: str
    param: nn.Parameter
    source: nn.Parameter | None = None
    quantize: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    module: str = ""  # the linear it belongs to, as LoRA files name it ("transformer.x", "text_encoder.y")


@dataclass(frozen=True)
class FusedState:
    """What is fused now: each weight that differs from pristine (by slot name) and the LoRAs it holds,
    and which weights the activation that returned this wrote (fused anew or restored)."""

    content: Mapping[str, Content]
    written: frozenset[str]


class WeightFuser:
    """Owns which deltas are fused into which weights, and the pristine copies that undo them."""

    def __init__(self, store: PristineStore | None = None) -> None:
        self.store = store or PristineStore()
        self._slots: dict[str, Slot] = {}
        self._by_param: dict[int, str] = {}  # id(param) -> slot name
        self._pristine: dict[str, dict[str, torch.Tensor]] = {}  # slot name -> inner tensors
        self._content: dict[str, Content] = {}  # slots that differ from pristine, and what they hold
        self._kept: set[str] = set()  # slots whose pristine copy this fuser made (not a home copy)
        self._absmax: dict[int, float] = {}  # id(weight) -> largest pristine magnitude (overflow bound)
        self._scratch_buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self._finite: dict[str, torch.Tensor] = {}
        self.state = FusedState({}, frozenset())

    @property
    def fused_count(self) -> int:
        """How many weights currently differ from their pristine copy."""
        return len(self._content)

    def apply(
        self,
        plan: Mapping[Slot | nn.Parameter, Sequence[ScaledDelta]],
        groups: Iterable[str] | None = None,
    ) -> FusedState:
        """Make the weights of `groups` hold exactly `plan` (an empty plan restores them); weights of
        other groups are left as they are. `groups` defaults to every group (the plan's and the fused).

        Only weights whose content changes are written. On any failure every weight is restored to
        pristine before the error propagates, so a failed switch never leaves a half-fused model.
        """
        slots = {self._register(slot): parts for slot, parts in plan.items()}
        scope = None if groups is None else set(groups) | {slot.group for slot in slots}
        wanted = {slot.name: _content(parts) for slot, parts in slots.items()}
        written: set[str] = set()
        self._finite = {}
        try:
            for name in list(self._content):
                if name not in wanted and (scope is None or self._slots[name].group in scope):
                    self._restore(name)
                    written.add(name)
            for slot, parts in slots.items():
                if self._content.get(slot.name) != wanted[slot.name]:
                    self._fuse(slot, parts)
                    written.add(slot.name)
            self._refuse_unrepresentable(slots)
        except BaseException:
            self.restore_all()
            raise
        self.state = FusedState(dict(self._content), frozenset(written))
        return self.state

    def _refuse_unrepresentable(self, slots: Mapping[Slot, Sequence[ScaledDelta]]) -> None:
        """Raise `UnrepresentableWeight` for a fused value that is not finite (it would make every
        image NaN), naming the LoRAs that overflow it alone (else all that touch it). One host sync per
        device, not one per weight."""
        if not self._finite:
            return
        flags: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for flag in self._finite.values():
            flags[flag.device].append(flag)
        if all(bool(torch.stack(device_flags).all()) for device_flags in flags.values()):
            return
        name = next(name for name, flag in self._finite.items() if not bool(flag))
        slot = self._slots[name]
        parts = next(parts for candidate, parts in slots.items() if candidate.name == name)
        master = self.pristine(slot.source) if slot.source is not None else self._pristine[name][""]
        device = next(iter(inner_tensors(slot.param).values())).device
        alone = {
            part.order
            for part in parts
            if not bool(
                fused_weight(master, [part], torch.empty(master.shape, dtype=master.dtype, device=device))
                .isfinite()
                .all()
            )
        }
        named = slot.source if slot.source is not None else slot.param
        raise UnrepresentableWeight(named, tuple(sorted(alone or {p.order for p in parts})))

    def restore_all(self) -> None:
        """Put every touched weight back to its pristine bytes."""
        for name in list(self._content):
            self._restore(name)
        self.state = FusedState({}, frozenset())

    def forget(self, group: str) -> None:
        """`group`'s weights are pristine again without a write (an offloaded module went home, where
        its copy was never written): drop their records."""
        for name in [n for n in self._content if self._slots[n].group == group]:
            del self._content[name]
        self.state = FusedState(dict(self._content), frozenset())

    def fused_slots(self, groups: Iterable[str]) -> list[Slot]:
        """The slots of `groups` that hold a LoRA now."""
        wanted = set(groups)
        return [self._slots[name] for name in self._content if self._slots[name].group in wanted]

    def pristine_bytes(self, group: str) -> int:
        """Bytes of the pristine copies kept for `group`'s weights (an offloaded module's home copy
        is not counted: it exists anyway)."""
        return sum(
            tensor.numel() * tensor.element_size()
            for name in self._kept
            if self._slots[name].group == group
            for tensor in self._pristine[name].values()
        )

    def pristine(self, param: torch.Tensor) -> torch.Tensor:
        """`param`'s pristine value: its kept copy while a LoRA is fused into it, else `param` itself."""
        name = self._by_param.get(id(param))
        if name is not None and name in self._content:
            return self._pristine[name][""]
        return param.detach()

    def _register(self, slot: Slot | nn.Parameter) -> Slot:
        if not isinstance(slot, Slot):  # a bare parameter: a full-precision weight of its own group
            slot = Slot(f"param-{id(slot)}", "params", slot)
        known = self._slots.setdefault(slot.name, slot)
        if known.param is not slot.param:
            raise ValueError(f"two weights registered as {slot.name!r}")
        self._by_param[id(known.param)] = known.name
        return known

    def _fuse(self, slot: Slot, parts: Sequence[ScaledDelta]) -> None:
        if slot.name not in self._pristine:
            home = self.store.home(slot.param)
            if home is not None:
                self._pristine[slot.name] = inner_tensors(home)
            elif self.store.adopts(slot.param):
                # The loaded tensor itself becomes the pristine copy and the weight gets fresh memory:
                # no copy made, and on a CPU the weights read from a memory-mapped file stay there
                # (clean pages the kernel may drop and read again) while the fused ones, written every
                # switch, get ordinary memory (writing into the mapped file's pages is ~2x slower).
                self._pristine[slot.name] = {"": slot.param.detach()}
                set_storage(slot.param, torch.empty_like(slot.param, memory_format=torch.contiguous_format))
                self._kept.add(slot.name)
            else:
                self._pristine[slot.name] = {
                    p: self.store.keep(t) for p, t in inner_tensors(slot.param).items()
                }
                self._kept.add(slot.name)
        self._content[slot.name] = DIRTY  # recorded first: an interrupted write is restored
        with torch.no_grad():
            if slot.source is None:
                value = fused_weight(self._pristine[slot.name][""], parts, slot.param.data)
            else:
                value = self._fuse_derived(slot, parts)
            source = slot.source if slot.source is not None else slot.param
            if self._may_overflow(source, parts, value.dtype):
                self._finite[slot.name] = value.isfinite().all()
        self._content[slot.name] = _content(parts)

    def _may_overflow(self, source: torch.Tensor, parts: Sequence[ScaledDelta], dtype: torch.dtype) -> bool:
        """Whether `pristine + Σ deltas` could leave `dtype`'s range, by a bound from the factors' largest
        entries (`delta.bound()`, e.g. |Σ_k u_ik d_kj| <= rank · max|u| · max|d|): only then is the fused
        value checked element by element, a pass over the weight that a switch should not pay for nothing."""
        key = id(source)
        if key not in self._absmax:  # once per weight: its pristine largest magnitude
            self._absmax[key] = float(self.pristine(source).abs().max()) if source.numel() else 0.0
        bound = self._absmax[key] + sum(abs(part.scale) * part.delta.bound() for part in parts)
        return not bound < torch.finfo(dtype).max / 2

    def _fuse_derived(self, slot: Slot, parts: Sequence[ScaledDelta]) -> torch.Tensor:
        """An fp8 (or other derived) weight: quantize(master pristine + LoRAs), on the slot's device;
        returns the full-precision value it was made from."""
        assert slot.source is not None
        targets = inner_tensors(slot.param)
        device = next(iter(targets.values())).device
        master = self.pristine(slot.source)
        value = fused_weight(master, parts, self._scratch(master.shape, master.dtype, device))
        fresh = inner_tensors(slot.quantize(value)) if slot.quantize is not None else {"": value}
        if fresh.keys() != targets.keys():  # a layer the quantizer skips stays in full precision
            fresh = {"": value}
        for part, tensor in targets.items():
            tensor.copy_(fresh[part])
        return value

    def _scratch(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A layer-sized buffer, reused across layers and switches: a fresh one per layer would pay the
        host's page faults on every switch (CUDA's caching allocator needs no help, but is given it)."""
        numel = shape.numel()
        buffer = self._scratch_buffers.get((dtype, device))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._scratch_buffers[(dtype, device)] = buffer
        return buffer[:numel].view(shape)

    def _restore(self, name: str) -> None:
        targets = inner_tensors(self._slots[name].param)
        with torch.no_grad():
            for part, tensor in targets.items():
                tensor.copy_(self._pristine[name][part], non_blocking=True)
        del self._content[name]


def _content(parts: Sequence[ScaledDelta]) -> Content:
    return tuple(sorted((part.order, part.scale) for part in parts))
