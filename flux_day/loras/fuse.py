"""Exact fuse and restore of LoRA deltas: one record per weight written, keyed by the parameter itself.

A weight's pristine copy is kept the first time it is written (its home copy, else GPU room, else
pinned host memory); every fuse writes from it and every restore copies it back, so any switch sequence
ends bit-identical. An fp8 weight gets `quantize(master pristine + LoRA)`; the master is never written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from flux_day.loras.delta_math import ScaledDelta, fused_weight
from flux_day.memory_plan import MemoryPlan, pristine_site
from flux_day.residency import PinnedArena, inner_tensors, set_storage, tensor_bytes

Content = tuple[tuple[str, float], ...]  # (LoRA digest, scale) pairs fused into a weight, sorted
DIRTY: Content = (("<being written>", float("nan")),)  # a write under way: restored on any failure
Quantize = Callable[[torch.Tensor], torch.Tensor]


class UnrepresentableWeight(ArithmeticError):
    """A fused parameter holds NaN or infinity: the sum is beyond what its dtype can hold."""

    def __init__(self, param: torch.Tensor, orders: tuple[str, ...]) -> None:
        super().__init__(f"a fused {param.dtype} parameter is not finite")
        self.param = param
        self.orders = orders  # the `order` of each delta that overflows it (which LoRAs)


@dataclass
class Fused:
    """A weight LoRAs have written: its group (plan name), pristine inner tensors, master (fp8 copies)."""

    group: str
    pristine: dict[str, torch.Tensor]
    source: torch.Tensor | None = None
    content: Content | None = None  # None: pristine
    absmax: float | None = None  # the pristine value's largest magnitude, measured once (overflow bound)


class WeightFuser:
    """Which deltas are fused into which weights, and the pristine copies that undo them."""

    def __init__(
        self,
        plan: MemoryPlan | None = None,
        host: PinnedArena | None = None,
        quantize: Quantize | None = None,
    ) -> None:
        self.plan, self.quantize = plan, quantize
        self.host = host or PinnedArena(pin=torch.cuda.is_available())
        self.records: dict[torch.Tensor, Fused] = {}
        self.device_bytes = 0  # pristine copies kept on the GPU: measured against the plan's room
        self._scratch_buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    @property
    def fused(self) -> dict[torch.Tensor, Content]:
        return {param: record.content for param, record in self.records.items() if record.content}

    def apply(
        self,
        plan: Mapping[torch.Tensor, Sequence[ScaledDelta]],
        group: str = "",
        into: Mapping[torch.Tensor, torch.Tensor] | None = None,
    ) -> set[torch.Tensor]:
        """Make `group`'s weights hold exactly `plan` (other groups keep theirs); returns those written.
        `into` maps masters to fp8 parameters. On any failure every weight is restored first."""
        targets = {(into or {}).get(param, param): (param, parts) for param, parts in plan.items()}
        written: set[torch.Tensor] = set()
        finite: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            for param, record in self.records.items():
                if record.group == group and record.content and param not in targets:
                    self._restore(param)
                    written.add(param)
            for param, (source, parts) in targets.items():
                if param not in self.records:
                    self.records[param] = Fused(group, self._pristine_copy(param), source if into else None)
                if self.records[param].content != _content(parts):
                    flag = self._fuse(param, parts)
                    if flag is not None:
                        finite.append((param, flag))
                    written.add(param)
            self._refuse_unrepresentable(finite, targets)
        except BaseException:
            self.restore_all()
            raise
        return written

    def restore_all(self) -> None:
        for param, record in self.records.items():
            if record.content:
                self._restore(param)

    def forget(self, group: str) -> None:
        """`group`'s weights are pristine again without a write (an offloaded module went home)."""
        for record in self.records.values():
            if record.group == group:
                record.content = None

    def pristine(self, param: torch.Tensor) -> torch.Tensor:
        """`param`'s pristine value: its kept copy while a LoRA is fused into it, else itself."""
        record = self.records.get(param)
        return record.pristine[""] if record is not None and record.content else param.detach()

    def _pristine_copy(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        home = self.host.homes.get(id(param))
        if home is not None:
            return inner_tensors(home)
        if not param.is_cuda and not hasattr(param, "__tensor_flatten__") and param.is_contiguous():
            # The loaded tensor becomes the copy: memory-mapped pages stay clean, and the weight gets
            # ordinary memory for its writes (~2x faster).
            pristine = param.detach()
            set_storage(param, torch.empty_like(param, memory_format=torch.contiguous_format))
            return {"": pristine}
        return {key: self._keep(tensor.detach()) for key, tensor in inner_tensors(param).items()}

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_cuda and self.plan is not None:
            if pristine_site(self.plan, self.device_bytes, tensor_bytes(tensor)) == "host":
                return self.host.copy(tensor)
            self.device_bytes += tensor_bytes(tensor)
        return tensor.clone()

    def _fuse(self, param: torch.Tensor, parts: Sequence[ScaledDelta]) -> torch.Tensor | None:
        """Write `param` from its pristine copy plus `parts`; returns whether the sum is finite (a flag),
        or None when no sum of these magnitudes can overflow."""
        record = self.records[param]
        base = self.pristine(record.source) if record.source is not None else record.pristine[""]
        if record.absmax is None:
            record.absmax = float(base.abs().max()) if base.numel() else 0.0
        # Checking every entry is a pass over the weight, slower than the fuse on a CPU: only when the
        # bound from the factors (`Delta.bound`; LyCORIS has none) could reach the dtype's range.
        bound = record.absmax + sum(
            abs(part.scale) * getattr(part.delta, "bound", math.inf) for part in parts
        )
        record.content = DIRTY  # recorded first: an interrupted write is restored
        with torch.no_grad():
            if record.source is None:
                value = fused_weight(record.pristine[""], parts, param.data)
            else:
                targets = inner_tensors(param)
                master = self.pristine(record.source)
                device = next(iter(targets.values())).device
                value = fused_weight(master, parts, self._scratch(master.shape, master.dtype, device))
                subclass = self.quantize is not None and hasattr(param, "__tensor_flatten__")
                fresh = inner_tensors(self.quantize(value)) if subclass else {"": value}
                for key, tensor in targets.items():
                    tensor.copy_(fresh[key])
            finite = None if bound < torch.finfo(value.dtype).max / 2 else value.isfinite().all()
        record.content = _content(parts)
        return finite

    def _refuse_unrepresentable(
        self,
        finite: list[tuple[torch.Tensor, torch.Tensor]],
        targets: Mapping[torch.Tensor, tuple[torch.Tensor, Sequence[ScaledDelta]]],
    ) -> None:
        """Raise `UnrepresentableWeight` for a non-finite fused value (every image would be NaN), naming the
        LoRAs that overflow it alone (else all): one sync per device."""
        flags = [flag for _, flag in finite]
        if all(
            bool(torch.stack([f for f in flags if f.device == d]).all()) for d in {f.device for f in flags}
        ):
            return
        param = next(param for param, flag in finite if not bool(flag))
        source, parts = targets[param]
        master = self.pristine(source) if source is not param else self.records[param].pristine[""]
        out = self._scratch(master.shape, master.dtype, next(iter(inner_tensors(param).values())).device)
        alone = {part.order for part in parts if not bool(fused_weight(master, [part], out).isfinite().all())}
        raise UnrepresentableWeight(source, tuple(sorted(alone or {part.order for part in parts})))

    def _scratch(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A layer-sized buffer reused across switches (a fresh one would page-fault each time)."""
        key, size = (dtype, device), shape.numel()
        if key not in self._scratch_buffers or self._scratch_buffers[key].numel() < size:
            self._scratch_buffers[key] = torch.empty(size, dtype=dtype, device=device)
        return self._scratch_buffers[key][:size].view(shape)

    def _restore(self, param: torch.Tensor) -> None:
        record = self.records[param]
        with torch.no_grad():
            for key, tensor in inner_tensors(param).items():
                tensor.copy_(record.pristine[key], non_blocking=True)
        record.content = None


def _content(parts: Sequence[ScaledDelta]) -> Content:
    return tuple(sorted((part.order, part.scale) for part in parts))
