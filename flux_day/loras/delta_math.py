"""The arithmetic of a LoRA fuse: `pristine + Σ scale · delta`, summed in float32 and rounded once.

A delta stays in the form its file stores it (low-rank factors, LyCORIS' Kronecker or Hadamard factors,
a dense `diff`) until the fuse expands it on the weight's device, `CHUNK_ROWS` rows at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeGuard

import torch

# Rows fused per step (float32 copies of a non-float32 weight's rows, expanded LoKr/LoHa rows): each
# temporary stays at 4096 rows (48 MB at FLUX's widest input, 15360).
CHUNK_ROWS = 4096


class Update(Protocol):
    """Any parameter update a LoRA file encodes (`Delta`; LyCORIS' `Kronecker`, `Hadamard`)."""

    scale: float

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the update ((out, in) for a weight, (out,) for a bias), without computing it."""

    def rows(self, rows: slice, device: torch.device, times: float = 1.0) -> torch.Tensor:
        """`times · scale ·` rows `rows` of the update, in float32 on `device` (not to be written)."""

    def rows_from(self, first: int, count: int) -> Update:
        """`count` rows of this whole-module update from row `first`, wrapping (BFL's swapped halves)."""

    def prepared(self, device: torch.device) -> Update:
        """The same update with what every chunk reads (small factors, their products) on `device`."""

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors it holds (what it costs in memory)."""


def rotated_rows(tensor: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Rows `first … first + count` of `tensor`, wrapping past its last row: a view unless it wraps."""
    stop = first + count
    if stop <= tensor.shape[0]:
        return tensor[first:stop]
    return torch.cat([tensor[first:], tensor[: stop - tensor.shape[0]]])


@dataclass(frozen=True)
class Delta:
    """One parameter's update, `scale · up @ down`; `down` is None when `up` is already the full update
    (a dense weight update, or a bias update, which is a vector)."""

    up: torch.Tensor
    down: torch.Tensor | None
    scale: float

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.up.shape) if self.down is None else (self.up.shape[0], self.down.shape[1])

    def matrix(self, device: torch.device) -> torch.Tensor:
        """The update in float32 on `device`."""
        return self.rows(slice(None), device)

    def rows(self, rows: slice, device: torch.device, times: float = 1.0) -> torch.Tensor:
        """`times · scale ·` rows `rows` of the update, in float32 on `device` (the scale on `up`)."""
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


@dataclass(frozen=True)
class ScaledDelta:
    """One LoRA's delta for one weight, and the user's scale for that LoRA."""

    order: str  # sort key that makes the sum independent of which input named the LoRA
    delta: Update
    scale: float


def inner_tensors(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain tensors a tensor subclass (a torchao fp8 weight: `qdata`, `scale`) is made of, or the
    weight itself under the key ""."""
    if hasattr(weight, "__tensor_flatten__"):
        names, _ = weight.__tensor_flatten__()
        return {name: getattr(weight, name) for name in names}
    return {"": weight}


def fused_weight(pristine: torch.Tensor, parts: Sequence[ScaledDelta], out: torch.Tensor) -> torch.Tensor:
    """Write `pristine + Σ part.scale · delta` into `out` (on its device, in its dtype), LoRAs in a fixed
    order: one `addmm` over every low-rank delta's factors stacked along the rank (no full-size product),
    then every other delta added `CHUNK_ROWS` rows at a time. Float32 weights are written in place; others
    go through a float32 copy of each chunk of rows. `pristine` may be in host memory: read once."""
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
    """Whether `delta` is `up @ down` (stacked into the one `addmm`), not a dense or LyCORIS update."""
    return isinstance(delta, Delta) and delta.down is not None
