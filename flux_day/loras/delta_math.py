"""The arithmetic of a LoRA fuse: `pristine + Σ scale · delta` written once into a weight.

All low-rank deltas of a weight go through one `addmm` over their factors stacked along the rank (no
zero buffer, no full-size product); dense deltas (LyCORIS, `diff`, `diff_b`) are added after it. The
scales go on the small `up` factors. Float32 weights are written directly; others go through a
float32 scratch of `CHUNK_ROWS` rows, so the sum is computed in float32 and rounded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flux_day.loras.formats import Delta

# Rows of a non-float32 weight fused per step through a float32 copy: the math stays in float32 with
# one rounding at the end, and the scratch stays at 4096 rows (48 MB at FLUX's widest input, 15360).
CHUNK_ROWS = 4096


@dataclass(frozen=True)
class ScaledDelta:
    """One LoRA's delta for one weight, and the user's scale for that LoRA."""

    order: str  # sort key that makes the sum independent of which input named the LoRA
    delta: Delta
    scale: float


def inner_tensors(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain tensors a tensor subclass (a torchao fp8 weight: `qdata`, `scale`) is made of, or the
    weight itself under the key ""."""
    if hasattr(weight, "__tensor_flatten__"):
        names, _ = weight.__tensor_flatten__()
        return {name: getattr(weight, name) for name in names}
    return {"": weight}


def fused_weight(pristine: torch.Tensor, parts: Sequence[ScaledDelta], out: torch.Tensor) -> torch.Tensor:
    """Write `pristine + Σ part.scale · delta` into `out` (on `out`'s device, in `out`'s dtype): one
    `addmm` for every low-rank delta at once; dense deltas (LyCORIS) are added after it.

    `pristine` may live elsewhere (pinned host memory): it is brought over once. Float32 weights are
    written directly (copy, then the deltas added in place); others go `CHUNK_ROWS` rows at a time
    through a float32 copy of those rows, so the sum is computed in float32 and rounded once.
    """
    device = out.device
    ordered = sorted(parts, key=lambda part: (part.order, part.scale))
    low_rank = [part for part in ordered if part.delta.down is not None]
    dense = [part for part in ordered if part.delta.down is None]
    source = pristine.to(device, non_blocking=True)
    ups = downs = None
    if low_rank:
        # The scales go on the small `up` factors, never on an out x in product.
        ups = torch.cat(
            [p.delta.up.to(device, torch.float32) * (p.scale * p.delta.scale) for p in low_rank], dim=1
        )
        downs = torch.cat([p.delta.down.to(device, torch.float32) for p in low_rank], dim=0)
    if out.dtype == torch.float32:
        out.copy_(source)
        _add_deltas(out, ups, downs, dense, slice(None))
        return out
    for start in range(0, out.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        chunk = source[rows].to(torch.float32, copy=True)  # the one float32 temporary: these rows
        out[rows].copy_(_add_deltas(chunk, ups, downs, dense, rows))
    return out


def _add_deltas(
    target: torch.Tensor,
    ups: torch.Tensor | None,
    downs: torch.Tensor | None,
    dense: Sequence[ScaledDelta],
    rows: slice,
) -> torch.Tensor:
    """`target += ups[rows] @ downs + Σ dense[rows]` in place, in float32."""
    if ups is not None and downs is not None:
        target.addmm_(ups[rows], downs)
    for part in dense:
        target.add_(part.delta.up[rows].to(target.device, torch.float32), alpha=part.scale * part.delta.scale)
    return target
