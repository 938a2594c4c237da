"""Exact fuse and restore of LoRA deltas into linear weights.

The first time a weight is touched, a pristine copy is kept for the life of the process. Every fuse
computes `pristine + Σ scale_i · delta_i` in float32 from that copy and casts once, and every restore
copies the pristine tensor back: no subtraction, so base → A → B → A+B → none ends bit-identical to the
start. Deltas are summed in a fixed order, so main + extra gives the same bytes as extra + main. Bias
updates (ComfyUI's `diff_b`) are deltas of a bias parameter and follow the same path. A fused parameter
its dtype cannot hold (a sum past fp16's 65504 or bf16's ~3.4e38 is infinite) is refused, restoring all.

On CUDA a pristine copy stays on the GPU while the memory plan's reserve (`DEFAULT_RESERVE`) stays free, and
goes to pinned host memory otherwise: a LoRA over every linear of FLUX.1 [dev] touches ~24 GB of
bf16 weights, which must not push both models out of an 80 GB card.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from flux_day.loras.formats import Delta
from flux_day.memory_plan import DEFAULT_RESERVE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScaledDelta:
    """One LoRA's delta for one weight, and the user's scale for that LoRA."""

    order: str  # sort key that makes the sum independent of which input named the LoRA
    delta: Delta
    scale: float


class UnrepresentableWeight(ArithmeticError):
    """A fused parameter holds NaN or infinity: the sum is beyond what its dtype can hold."""

    def __init__(self, param: nn.Parameter, orders: tuple[str, ...]) -> None:
        super().__init__(f"a fused {param.dtype} parameter is not finite")
        self.param = param
        self.orders = orders  # the `order` of each delta summed into it (which LoRAs)


class WeightFuser:
    """Owns which deltas are fused into which weights, and the pristine copies that undo them."""

    def __init__(self) -> None:
        self._pristine: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        self._fused: set[int] = set()
        self.active: tuple = ()

    @property
    def fused_count(self) -> int:
        """How many weights currently differ from their pristine copy."""
        return len(self._fused)

    def apply(self, plan: Mapping[nn.Parameter, Sequence[ScaledDelta]], key: tuple) -> bool:
        """Make the fused state exactly `plan` (an empty plan restores everything); False if already so.

        On any failure every weight is restored to pristine before the error propagates, so a failed
        switch never leaves a half-fused model.
        """
        if key == self.active and self._fused == {id(p) for p in plan}:
            return False
        self.active = ()
        try:
            wanted = {id(param) for param in plan}
            for param_id in list(self._fused - wanted):
                self._restore(param_id)
            with torch.no_grad():
                for param, parts in plan.items():
                    self._fuse(param, parts)
            self._refuse_unrepresentable(plan)
        except BaseException:
            self.restore_all()
            raise
        self.active = key
        return True

    def restore_all(self) -> None:
        """Put every touched weight back to its pristine bytes."""
        for param_id in list(self._fused):
            self._restore(param_id)
        self.active = ()

    def _restore(self, param_id: int) -> None:
        param, pristine = self._pristine[param_id]
        with torch.no_grad():
            param.data.copy_(pristine)
        self._fused.discard(param_id)

    def _refuse_unrepresentable(self, plan: Mapping[nn.Parameter, Sequence[ScaledDelta]]) -> None:
        """Raise `UnrepresentableWeight` for a fused parameter that is not finite (it would make every
        image NaN), naming the LoRAs that overflow it alone (else all that touch it). One host sync per
        device, not one per parameter."""
        flags: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for param in plan:
            flags[param.device].append(param.detach().isfinite().all())
        if all(bool(torch.stack(device_flags).all()) for device_flags in flags.values()):
            return
        bad = next(param for param in plan if not bool(param.detach().isfinite().all()))
        pristine = self._pristine[id(bad)][1].to(bad.device, torch.float32)
        alone = {
            part.order
            for part in plan[bad]
            if not bool(
                (pristine + part.scale * part.delta.matrix(bad.device)).to(bad.dtype).isfinite().all()
            )
        }
        raise UnrepresentableWeight(bad, tuple(sorted(alone or {part.order for part in plan[bad]})))

    def _fuse(self, param: nn.Parameter, parts: Sequence[ScaledDelta]) -> None:
        if id(param) not in self._pristine:
            self._pristine[id(param)] = (param, _pristine_copy(param))
        pristine = self._pristine[id(param)][1]
        device = param.device
        total = torch.zeros(pristine.shape, dtype=torch.float32, device=device)
        for part in sorted(parts, key=lambda part: (part.order, part.scale)):
            total.add_(part.delta.matrix(device), alpha=part.scale)
        self._fused.add(id(param))
        param.data.copy_((pristine.to(device, torch.float32) + total).to(param.dtype))


def _pristine_copy(param: nn.Parameter) -> torch.Tensor:
    """A copy of `param` that nothing else writes: on its GPU while memory allows, else pinned host."""
    weight = param.detach()
    if weight.is_cuda:
        free, _ = torch.cuda.mem_get_info(weight.device)
        if free - weight.nbytes < DEFAULT_RESERVE:
            return weight.to("cpu").pin_memory()
    return weight.clone()
