"""Any FLUX LoRA file → one update per target linear weight (and bias), checked against the loaded model.

Every layout is split by `ModuleIndex`, built from the loaded model's shapes (diffusers' converters
hard-code FLUX.1's widths and drop kohya `final_layer` alphas); only XLabs' names go through diffusers'.
A module that matches nothing is a refusal, never a LoRA silently applied in part.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

from flux_day.errors import LoraError
from flux_day.loras.delta_math import Delta, Update
from flux_day.loras.flux_layout import ModuleIndex, Target
from flux_day.loras.lycoris import LYCORIS_ROLES, lycoris_delta
from flux_day.loras.refusals import refuse_unsupported
from flux_day.loras.safetensors_file import LoraSource, load_lora_file, lora_file_identity

ROLES = {".lora_down.weight": "down", ".lora_A.weight": "down", ".down.weight": "down"}  # .down: XLabs
ROLES |= {".lora_up.weight": "up", ".lora_B.weight": "up", ".up.weight": "up", ".alpha": "alpha"}
ROLES |= {f".{role}": role for role in LYCORIS_ROLES}
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_")
# ComfyUI's full updates, applied as `W + strength · diff` (".diff_b" first: ".diff" is its prefix).
FULL_UPDATES = {".diff_b": "bias", ".diff": "weight"}
Groups = dict[str, dict[str, torch.Tensor]]  # module -> role (or "weight"/"bias") -> tensor


@dataclass(frozen=True)
class LoraWeights:
    """A parsed LoRA: weight and bias updates keyed by target linear, and its identity."""

    deltas: dict[str, Update]
    biases: dict[str, Update]
    digest: str
    layout: str
    nbytes: int  # of the file

    @property
    def modules(self) -> frozenset[str]:
        return frozenset(self.deltas) | frozenset(self.biases)

    @cached_property
    def held_bytes(self) -> int:
        """What keeping it parsed costs: each storage once (targets split from one module share it)."""
        storages = {
            tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
            for delta in (*self.deltas.values(), *self.biases.values())
            for tensor in delta.tensors()
        }
        return sum(storages.values())


def read_lora(source: LoraSource, index: ModuleIndex, model_label: str) -> LoraWeights:
    """A safetensors LoRA's updates for the model `index` describes, or a refusal saying why."""
    state_dict, metadata = load_lora_file(source)
    state_dict = refuse_unsupported(state_dict, index)
    groups, full = _group(state_dict)
    if not groups and not full:
        raise LoraError("the file holds no LoRA weights; give a FLUX LoRA .safetensors file.")
    both = sorted(module for module in full if "weight" in full[module] and module in groups)
    if both:
        raise LoraError(
            f"module {both[0][:80]!r} has both low-rank factors and a full weight update "
            "(diff), which tools apply differently; give a LoRA with one of them per module."
        )
    layout = _layout(groups)
    # XLabs' own names match no module until diffusers converts them (`_xlabs` checks what it returns).
    _refuse_unmatched([*full] if layout == "XLabs" else [*groups, *full], index, model_label)
    if layout == "XLabs":
        deltas = _xlabs(state_dict, index, model_label)
    else:
        deltas = _split_all(groups, index, json.loads(metadata.get("lora_adapter_metadata") or "{}"))
    biases: dict[str, Update] = {}
    for module, updates in full.items():
        for kind, update in updates.items():
            targets = index.resolve(module) or ()
            if update.ndim != (2 if kind == "weight" else 1) or update.shape[0] != targets[-1].stop:
                shape = "x".join(map(str, update.shape))
                raise LoraError(
                    f"the {kind} update of {module[:80]!r} has shape {shape}, which does not fit the "
                    f"model's {targets[-1].stop} outputs; it is probably for another model."
                )
            (deltas if kind == "weight" else biases).update(_split(Delta(update, None, 1.0), targets))
    _check_fit(deltas, biases, index, model_label)
    digest, nbytes = lora_file_identity(source)
    return LoraWeights(deltas, biases, digest, layout, nbytes)


def _layout(groups: Groups) -> str:  # the trainer family, for the log
    if any(role in LYCORIS_ROLES for roles in groups.values() for role in roles):
        return "LyCORIS"
    if any(".processor." in module for module in groups):
        return "XLabs"
    return "kohya" if any(module.startswith(KOHYA_PREFIXES) for module in groups) else "by module name"


def _group(state_dict: dict[str, torch.Tensor]) -> tuple[Groups, Groups]:
    """({module: {role: factor}}, {module: {"weight" | "bias": full update}}), by key suffix."""
    groups: Groups = defaultdict(dict)
    full: Groups = defaultdict(dict)
    for key, value in state_dict.items():
        if suffix := next((s for s in FULL_UPDATES if key.endswith(s)), None):
            full[key.removesuffix(suffix)][FULL_UPDATES[suffix]] = value
        elif suffix := next((s for s in ROLES if key.endswith(s)), None):
            groups[key.removesuffix(suffix)][ROLES[suffix]] = value
        else:
            raise LoraError(
                f"key {key[:80]!r} is not part of a LoRA (expected lora_A/lora_B, "
                "lora_down/lora_up, alpha or LyCORIS factors); give a FLUX LoRA file."
            )
    return dict(groups), dict(full)


def _refuse_unmatched(modules: list[str], index: ModuleIndex, model_label: str) -> None:
    unmatched = [module for module in modules if index.resolve(module) is None]
    if unmatched:
        raise LoraError(
            f"{len(modules) - len(unmatched)} of {len(modules)} modules in this LoRA match a "
            f"module of {model_label} (first unmatched: {unmatched[0][:80]!r}); it is probably for another "
            "model, and is refused rather than applied in part."
        )


def _xlabs(state_dict: dict[str, torch.Tensor], index: ModuleIndex, model_label: str) -> dict[str, Update]:
    """XLabs' `processor.qkv_lora1`-style names, mapped onto diffusers' names by diffusers' converter."""
    low_rank = {k: v.clone() for k, v in state_dict.items() if not k.endswith(tuple(FULL_UPDATES))}
    try:  # on copies: diffusers' converters scale some factors in place
        converted, alphas = FluxLoraLoaderMixin.lora_state_dict(low_rank, return_alphas=True)
    except Exception:  # the library's message names its internals; ours names the layout
        raise LoraError(
            "the file looks like an XLabs LoRA but cannot be read as one; give an intact FLUX LoRA file."
        ) from None
    converted |= {key: torch.tensor(float(alpha)) for key, alpha in (alphas or {}).items()}
    groups, _ = _group(converted)
    _refuse_unmatched(sorted(groups), index, model_label)
    return _split_all(groups, index, {})


def _split_all(groups: Groups, index: ModuleIndex, adapter: dict[str, Any]) -> dict[str, Update]:
    """Each module's update, split over the linears `ModuleIndex` maps it to."""
    deltas: dict[str, Update] = {}
    for module, roles in groups.items():
        targets = index.resolve(module) or ()
        if any(role in LYCORIS_ROLES for role in roles):
            deltas |= _split(lycoris_delta(module, roles), targets)
            continue
        if "down" not in roles or "up" not in roles:
            raise LoraError(f"module {module[:80]!r} lacks its down or up matrix; the file is incomplete.")
        rank = roles["down"].shape[0]
        if "alpha" in roles:
            scale = roles["alpha"].item() / rank
        else:
            scale = _peft_scale(targets[0].module, rank, adapter) if targets else 1.0
        deltas |= _split(Delta(roles["up"], roles["down"], scale), targets)
    return deltas


def _peft_scale(target: str, rank: int, adapter: dict[str, Any]) -> float:
    """alpha/rank as PEFT computes it from the adapter metadata diffusers saves; 1 without metadata, as
    every tool loads such files."""
    component, bare = target.split(".", 1)
    config = {
        key.removeprefix(f"{component}."): value
        for key, value in adapter.items()
        if key.startswith(f"{component}.") or "." not in key
    }
    if "lora_alpha" not in config:
        return 1.0
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", bare):
            alpha = value
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _split(delta: Update, targets: tuple[Target, ...]) -> dict[str, Update]:
    """One update per target: its rows of `delta` (BFL's swapped halves rotated by half the rows)."""
    rows = delta.shape[0]
    if rows != targets[-1].stop:
        raise LoraError(
            f"the LoRA's update for {targets[0].module[:80]!r} has {rows} output rows "
            f"where the model has {targets[-1].stop}; it is probably for another model."
        )
    half = rows // 2 if targets[0].swap_halves else 0
    return {t.module: delta.rows_from(t.start + half, t.stop - t.start) for t in targets}


def _check_fit(
    deltas: dict[str, Update], biases: dict[str, Update], index: ModuleIndex, model_label: str
) -> None:
    for module, delta in deltas.items():
        weight = index.weights.get(module)
        low_rank = isinstance(delta, Delta) and delta.down is not None
        rank_fits = not low_rank or delta.up.shape[1] == delta.down.shape[0]
        if weight is None or not rank_fits or tuple(weight.shape) != delta.shape:
            wanted = "x".join(map(str, weight.shape)) if weight is not None else "?"
            ranks = f" with ranks {delta.up.shape[1]}/{delta.down.shape[0]}" if low_rank else ""
            raise LoraError(
                f"the LoRA's update for {module[:80]!r} does not fit {model_label} (it is "
                f"{'x'.join(map(str, delta.shape))}{ranks}, the model's weight is {wanted}); "
                "it is probably for another model."
            )
    for module, delta in biases.items():
        bias = index.biases.get(module)
        if bias is None or tuple(bias.shape) != delta.shape:
            raise LoraError(
                f"the LoRA's bias update (diff_b) for {module[:80]!r} does not fit "
                f"{model_label} (the module {'has no bias' if bias is None else f'has {bias.shape[0]}'}); "
                "it is probably for another model."
            )
