"""The arithmetic of a LoRA fuse: `pristine + Σ scale · delta`, summed in float32 and rounded once.

A delta stays in its file's form (low-rank, LyCORIS or dense factors) until the fuse expands it on the
weight's device, `CHUNK_ROWS` rows at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, TypeGuard

import torch

# Rows fused per step: each float32 temporary stays at 4096 rows (48 MB at FLUX's widest input, 15360).
CHUNK_ROWS = 4096


class Update(Protocol):
    """Any parameter update a LoRA file encodes (`Delta`; LyCORIS' `Kronecker`, `Hadamard`)."""

    scale: float

    @property
    def shape(self) -> tuple[int, ...]: ...  # (out, in) for a weight, (out,) for a bias, not computed

    def rows(self, rows: slice, device: torch.device, times: float = 1.0) -> torch.Tensor:
        """`times · scale ·` rows `rows` of the update, in float32 on `device` (not to be written)."""

    def rows_from(self, first: int, count: int) -> Update:
        """`count` rows from row `first`, wrapping (BFL's swapped halves)."""

    def prepared(self, device: torch.device) -> Update:
        """The same update with what every chunk reads (small factors, their products) on `device`."""

    def tensors(self) -> tuple[torch.Tensor, ...]: ...  # what it holds in memory


def rotated_rows(tensor: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Rows `first … first + count`, wrapping past the last row: a view unless it wraps."""
    stop = first + count
    if stop <= tensor.shape[0]:
        return tensor[first:stop]
    return torch.cat([tensor[first:], tensor[: stop - tensor.shape[0]]])


@dataclass(frozen=True)
class Delta:
    """One parameter's update, `scale · up @ down`; `down` is None when `up` is the full update (dense)."""

    up: torch.Tensor
    down: torch.Tensor | None
    scale: float

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.up.shape) if self.down is None else (self.up.shape[0], self.down.shape[1])

    def rows(self, rows: slice, device: torch.device, times: float = 1.0) -> torch.Tensor:
        up = self.up[rows].to(device, torch.float32)
        factor = times * self.scale
        up = up * factor if factor != 1 else up
        return up if self.down is None else up @ self.down.to(device, torch.float32)

    def rows_from(self, first: int, count: int) -> Delta:
        return Delta(rotated_rows(self.up, first, count), self.down, self.scale)

    def prepared(self, device: torch.device) -> Delta:
        return self  # a dense update's rows travel chunk by chunk, never whole

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.up,) if self.down is None else (self.up, self.down)

    @cached_property
    def bound(self) -> float:
        """No entry exceeds |scale| · rank · max|up| · max|down| (dense: |scale| · max|up|): lets the fuse
        skip checking a sum that cannot overflow."""
        if not all(tensor.numel() for tensor in self.tensors()):
            return 0.0
        largest = abs(self.scale) * float(self.up.abs().max())
        return largest if self.down is None else largest * float(self.down.abs().max()) * self.down.shape[0]


@dataclass(frozen=True)
class ScaledDelta:
    order: str  # sort key that makes the sum independent of which input named the LoRA
    delta: Update
    scale: float


def fused_weight(pristine: torch.Tensor, parts: Sequence[ScaledDelta], out: torch.Tensor) -> torch.Tensor:
    """Write `pristine + Σ scale · delta` into `out`, LoRAs in a fixed order: one `addmm` over the low-rank
    factors stacked along the rank, then other deltas by row chunks, in float32 (`pristine` read once)."""
    device = out.device
    ordered = sorted(parts, key=lambda part: (part.order, part.scale))
    low_rank = [(part.delta, part.scale) for part in ordered if _low_rank(part.delta)]
    others = [(part.delta.prepared(device), part.scale) for part in ordered if not _low_rank(part.delta)]
    source = pristine.to(device, non_blocking=True)
    ups = downs = None
    if low_rank:
        # The scales go on the small `up` factors, never on an out x in product.
        ups = torch.cat([d.up.to(device, torch.float32) * (s * d.scale) for d, s in low_rank], dim=1)
        downs = torch.cat([d.down.to(device, torch.float32) for d, _ in low_rank if d.down is not None])
    in_place = out.dtype == torch.float32
    if in_place:
        out.copy_(source)
        if ups is not None and downs is not None:
            out.addmm_(ups, downs)
        if not others:
            return out
    for start in range(0, out.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        if in_place:
            chunk = out[rows]
        else:
            chunk = source[rows].to(torch.float32, copy=True)  # the one float32 copy: these rows
            if ups is not None and downs is not None:
                chunk.addmm_(ups[rows], downs)
        for delta, scale in others:
            chunk.add_(delta.rows(rows, device, scale))
        if not in_place:
            out[rows].copy_(chunk)
    return out


def _low_rank(delta: Update) -> TypeGuard[Delta]:
    return isinstance(delta, Delta) and delta.down is not None
