"""Exact fuse and restore of LoRA deltas into linear weights.

The first time a weight is touched, a pristine copy is kept for the life of the process. Every fuse
computes `pristine + Σ scale_i · delta_i` in float32 from that copy and casts once, and every restore
copies the pristine tensor back: no subtraction, so base → A → B → A+B → none ends bit-identical to the
start. Deltas are summed in a fixed order, so main + extra gives the same bytes as extra + main.

On CUDA a pristine copy stays on the GPU while the memory plan's reserve (`DEFAULT_RESERVE`) stays free, and
goes to pinned host memory otherwise: a LoRA over every linear of FLUX.1 [dev] touches ~24 GB of
bf16 weights, which must not push both models out of an 80 GB card.
"""

from __future__ import annotations

import logging
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
