"""ComfyUI's full updates: `<module>.diff` (a whole weight's update) and `<module>.diff_b` (a bias update).

ComfyUI applies them as `W + strength · diff` and `bias + strength · diff_b`, and its LoRA extractor and
OneTrainer write them beside low-rank factors. A BFL module's update covers its fused rows (q, k, v, and
the MLP input of single blocks), so it is split by `ModuleIndex` exactly as low-rank updates are.
"""

from __future__ import annotations

import torch

from flux_day.errors import LoraError
from flux_day.loras.flux_layout import ModuleIndex, Target

FULL_UPDATE_SUFFIXES = {".diff_b": "bias", ".diff": "weight"}  # ".diff_b" first: ".diff" is its prefix


def split_off_full_updates(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(the rest of `state_dict`, {module: {"weight" | "bias": update}}) for the keys ending .diff/.diff_b."""
    rest: dict[str, torch.Tensor] = {}
    full: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        suffix = next((s for s in FULL_UPDATE_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            rest[key] = value
        else:
            full.setdefault(key.removesuffix(suffix), {})[FULL_UPDATE_SUFFIXES[suffix]] = value
    return rest, full


def full_deltas(
    full: dict[str, dict[str, torch.Tensor]], index: ModuleIndex
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({target: weight update}, {target: bias update}), split over the targets of each module."""
    weights: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    for module, updates in full.items():
        targets = index.resolve(module) or ()
        for kind, update in updates.items():
            wanted_ndim = 2 if kind == "weight" else 1
            if update.ndim != wanted_ndim or update.shape[0] != targets[-1].stop:
                raise LoraError(
                    f"the {kind} update of {module[:80]!r} has shape "
                    f"{'x'.join(map(str, update.shape))}, which does not fit the model's "
                    f"{targets[-1].stop} outputs; it is probably for another model."
                )
            (weights if kind == "weight" else biases).update(_rows(update, targets))
    return weights, biases


def _rows(update: torch.Tensor, targets: tuple[Target, ...]) -> dict[str, torch.Tensor]:
    """The rows of `update` that belong to each target (halves swapped where BFL and diffusers differ)."""
    if targets[0].swap_halves:
        first, second = update.chunk(2, dim=0)
        update = torch.cat([second, first], dim=0)
    return {t.module: update[t.start : t.stop] for t in targets}
