"""Any FLUX LoRA file → one delta per target linear weight (and bias), checked against the loaded model.

Files named as kohya writes them (`lora_unet_*`, `lora_te1_*`) go through diffusers'
`FluxLoraLoaderMixin.lora_state_dict` first, and XLabs files only through it. Its result is used only
when it covers every module the file names, because diffusers 0.42.1 fails on kohya single blocks of any
width but 3072 and drops the alpha of kohya `final_layer` modules; then `flux_layout.ModuleIndex`
splits the fused rows itself. Every other layout (diffusers/PEFT with or without `base_model.model.`,
ai-toolkit, SimpleTuner, OneTrainer `lora_transformer_*`, BFL/ComfyUI `diffusion_model.*`, fal's bare
`double_blocks.*`) is read by `ModuleIndex` directly: for those diffusers either passes the keys through
unchanged, converts them for FLUX.1's real width only (fal, 3072 hard-coded), or maps OneTrainer's
feed-forward and norm modules onto their block. LyCORIS LoKr/LoHa are read, still factored, in
`lycoris`; ComfyUI's full updates (`diff`, `diff_b`) in `full_updates`. A module that matches nothing is
a refusal, never a LoRA silently applied in part.
"""

from __future__ import annotations

import json
import logging
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
from flux_day.loras.full_updates import full_deltas, split_off_full_updates
from flux_day.loras.lycoris import LYCORIS_ROLES, lycoris_delta
from flux_day.loras.refusals import refuse_unsupported
from flux_day.loras.safetensors_file import LoraSource, load_lora_file, lora_file_identity
from flux_day.server_log import log as server_log

log = logging.getLogger(__name__)

LOW_RANK_ROLES = {
    ".lora_down.weight": "down",
    ".lora_A.weight": "down",
    ".lora_up.weight": "up",
    ".lora_B.weight": "up",
    ".down.weight": "down",  # XLabs
    ".up.weight": "up",
    ".alpha": "alpha",
}
ROLES = {**LOW_RANK_ROLES, **{f".{role}": role for role in LYCORIS_ROLES}}
# kohya's names: the one family diffusers converts for FLUX (at FLUX.1's real widths).
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_")


@dataclass(frozen=True)
class LoraWeights:
    """A parsed LoRA: weight and bias deltas keyed by target linear ("transformer.…"/"text_encoder.…"),
    and its identity."""

    deltas: dict[str, Update]
    biases: dict[str, Update]
    digest: str
    layout: str
    nbytes: int  # of the file

    @property
    def modules(self) -> frozenset[str]:
        """Every linear whose weight or bias this LoRA changes."""
        return frozenset(self.deltas) | frozenset(self.biases)

    @cached_property
    def held_bytes(self) -> int:
        """Bytes of memory its tensors hold, each storage once (the targets split from one module share
        its factors): what keeping it parsed costs."""
        storages = {
            tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
            for delta in (*self.deltas.values(), *self.biases.values())
            for tensor in delta.tensors()
        }
        return sum(storages.values())


def read_lora(source: LoraSource, index: ModuleIndex, model_label: str) -> LoraWeights:
    """Parse a safetensors LoRA (bytes or a file) into deltas for the model `index` describes, or refuse
    it saying why."""
    state_dict, metadata = load_lora_file(source)
    state_dict = refuse_unsupported(state_dict, index)
    state_dict, full = split_off_full_updates(state_dict)
    groups = _group(state_dict)
    if not groups and not full:
        raise LoraError("the file holds no LoRA weights; give a FLUX LoRA .safetensors file.")
    both = sorted(module for module in full if "weight" in full[module] and module in groups)
    if both:
        raise LoraError(
            f"module {both[0][:80]!r} has both low-rank factors and a full weight update "
            "(diff), which tools apply differently; give a LoRA with one of them per module."
        )
    lycoris = any(role in LYCORIS_ROLES for roles in groups.values() for role in roles)
    xlabs = not lycoris and any(".processor." in module for module in groups)
    # XLabs' own names match no module until diffusers converts them (`_xlabs` checks what it returns).
    _refuse_unmatched([*full] if xlabs else [*groups, *full], index, model_label)
    if lycoris:
        layout, deltas = "LyCORIS", _deltas_from_groups(groups, index, {})
    elif xlabs:
        layout, deltas = "XLabs", _xlabs(state_dict, index, model_label)
    elif any(module.startswith(KOHYA_PREFIXES) for module in groups):
        layout, deltas = "kohya", _kohya(state_dict, groups, index)
    else:
        adapter = json.loads(metadata.get("lora_adapter_metadata") or "{}")
        layout, deltas = "by module name", _deltas_from_groups(groups, index, adapter)
    full_weights, full_biases = full_deltas(full, index)
    deltas |= {module: Delta(update, None, 1.0) for module, update in full_weights.items()}
    biases: dict[str, Update] = {module: Delta(update, None, 1.0) for module, update in full_biases.items()}
    _check_fit(deltas, biases, index, model_label)
    digest, nbytes = lora_file_identity(source)
    return LoraWeights(deltas, biases, digest, layout, nbytes)


def _group(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in state_dict.items():
        suffix = next((s for s in ROLES if key.endswith(s)), None)
        if suffix is None:
            raise LoraError(
                f"key {key[:80]!r} is not part of a LoRA (expected lora_A/lora_B, "
                "lora_down/lora_up, alpha or LyCORIS factors); give a FLUX LoRA file."
            )
        groups[key.removesuffix(suffix)][ROLES[suffix]] = value
    return dict(groups)


def _refuse_unmatched(modules: list[str], index: ModuleIndex, model_label: str) -> None:
    unmatched = [module for module in modules if index.resolve(module) is None]
    if unmatched:
        raise LoraError(
            f"{len(modules) - len(unmatched)} of {len(modules)} modules in this LoRA match a "
            f"module of {model_label} (first unmatched: {unmatched[0][:80]!r}); it is probably for another "
            "model, and is refused rather than applied in part."
        )


def _kohya(
    state_dict: dict[str, torch.Tensor],
    groups: dict[str, dict[str, torch.Tensor]],
    index: ModuleIndex,
) -> dict[str, Update]:
    """kohya names: diffusers' converter when it covers every module, else the layout table."""
    expected = {target.module for module in groups for target in index.resolve(module) or ()}
    drops_alpha = any(
        "final_layer" in module and "alpha" in roles and roles["alpha"].item() != roles["down"].shape[0]
        for module, roles in groups.items()
        if "down" in roles
    )
    if not drops_alpha:
        try:
            converted, alphas = FluxLoraLoaderMixin.lora_state_dict(_copied(state_dict), return_alphas=True)
            deltas = _deltas_from_converted(converted, alphas or {}, index)
            if set(deltas) == expected:
                return deltas
            log.info(
                "diffusers' converter covered %d of %d targets; splitting by layout",
                len(deltas),
                len(expected),
            )
        except Exception as error:  # any converter failure means: split by the layout table
            log.info("diffusers' converter could not read it; splitting by layout")
            server_log.info("diffusers' kohya converter failed: %s", type(error).__name__)
    return _deltas_from_groups(groups, index, {})


def _xlabs(state_dict: dict[str, torch.Tensor], index: ModuleIndex, model_label: str) -> dict[str, Update]:
    """XLabs' `processor.qkv_lora1`-style names, converted by diffusers (which splits by thirds)."""
    try:
        converted, alphas = FluxLoraLoaderMixin.lora_state_dict(_copied(state_dict), return_alphas=True)
    except Exception:  # the library's message names its internals; ours names the layout
        raise LoraError(
            "the file looks like an XLabs LoRA but cannot be read as one; give an intact FLUX LoRA file."
        ) from None
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in converted if ".lora_" in key})
    _refuse_unmatched(modules, index, model_label)
    return _deltas_from_converted(converted, alphas or {}, index)


def _copied(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh tensors for diffusers: its kohya converter scales text-encoder factors in place."""
    return {key: value.clone() for key, value in state_dict.items()}


def _deltas_from_converted(
    converted: dict[str, torch.Tensor], alphas: dict[str, Any], index: ModuleIndex
) -> dict[str, Update]:
    """Deltas from diffusers' output (`<module>.lora_A.weight` / `.lora_B.weight`, PEFT naming)."""
    deltas: dict[str, Update] = {}
    for key, down in converted.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        up = converted.get(f"{module}.lora_B.weight")
        targets = index.resolve(module)
        if up is None or targets is None:
            continue
        alpha = alphas.get(f"{module}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        deltas.update(_split(Delta(up, down, scale), targets))
    return deltas


def _peft_scale(target: str, rank: int, adapter: dict[str, Any]) -> float:
    """alpha/rank as PEFT computes it from the adapter metadata diffusers saves (`<component>.lora_alpha`,
    `alpha_pattern`, `use_rslora`), looked up by the resolved `target`; 1 without metadata, as PEFT
    files without it (ai-toolkit, `adapter_model.safetensors`) are loaded everywhere."""
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
    denominator = math.sqrt(rank) if config.get("use_rslora") else rank
    return float(alpha) / denominator


def _deltas_from_groups(
    groups: dict[str, dict[str, torch.Tensor]], index: ModuleIndex, adapter: dict[str, Any]
) -> dict[str, Update]:
    """Deltas straight from the file's modules, split by `ModuleIndex`; alpha from `.alpha` keys, else
    from PEFT's adapter metadata."""
    deltas: dict[str, Update] = {}
    for module, roles in groups.items():
        targets = index.resolve(module) or ()
        if any(role in LYCORIS_ROLES for role in roles):
            deltas.update(_split(lycoris_delta(module, roles), targets))
            continue
        if "down" not in roles or "up" not in roles:
            raise LoraError(f"module {module[:80]!r} lacks its down or up matrix; the file is incomplete.")
        rank = roles["down"].shape[0]
        if "alpha" in roles:
            scale = roles["alpha"].item() / rank
        else:
            scale = _peft_scale(targets[0].module, rank, adapter) if targets else 1.0
        deltas.update(_split(Delta(roles["up"], roles["down"], scale), targets))
    return deltas


def _split(delta: Update, targets: tuple[Target, ...]) -> dict[str, Update]:
    """One delta per target: the rows of `delta` that are that target's output (halves swapped if needed,
    a rotation by half the rows)."""
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
