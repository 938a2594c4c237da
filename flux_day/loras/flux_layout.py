"""Where each module of the original (BFL) FLUX layout lives in diffusers' `FluxTransformer2DModel`.

BFL fuses q, k, v (and in single blocks the MLP input) into one linear; diffusers splits them. diffusers
0.42.1's converters hard-code full-size widths and skip BFL `diffusion_model.*.lora_A/B` names, so this
table, built from the loaded model's own shapes, is the one place that splits fused rows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from torch import nn

_DOUBLE_BLOCK = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
_SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
_TOP_LEVEL = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
# BFL's final modulation emits (shift, scale); diffusers' `norm_out` emits (scale, shift).
SWAPPED_HALVES = frozenset({"final_layer.adaLN_modulation.1"})
BLOCKS = {
    "transformer_blocks": ("double_blocks", _DOUBLE_BLOCK),
    "single_transformer_blocks": ("single_blocks", _SINGLE_BLOCK),
}


@dataclass(frozen=True)
class Target:
    """Rows `start:stop` of a LoRA module's output belong to `module` ("transformer.…"/"text_encoder.…")."""

    module: str
    start: int
    stop: int
    swap_halves: bool = False


def bfl_table(transformer: nn.Module) -> dict[str, tuple[Target, ...]]:
    """Every BFL module name of this transformer, mapped to the diffusers linears that hold its rows."""
    modules = dict(transformer.named_modules())
    layout = dict(_TOP_LEVEL)
    for name, module in modules.items():
        if name in BLOCKS:
            bfl_prefix, block = BLOCKS[name]
            for i in range(len(module)):
                layout |= {
                    f"{bfl_prefix}.{i}.{bfl}": tuple(f"{name}.{i}.{t}" for t in ts)
                    for bfl, ts in block.items()
                }
    table: dict[str, tuple[Target, ...]] = {}
    for bfl_name, names in layout.items():
        if not all(isinstance(modules.get(name), nn.Linear) for name in names):
            continue  # e.g. guidance_in on schnell, which has no guidance embedder
        stops = list(itertools.accumulate(modules[name].out_features for name in names))
        swap = bfl_name in SWAPPED_HALVES
        table[bfl_name] = tuple(
            Target(f"transformer.{name}", stop - modules[name].out_features, stop, swap)
            for name, stop in zip(names, stops, strict=True)
        )
    return table


class ModuleIndex:
    """Every spelling of a module name that FLUX LoRA files use (diffusers, BFL, fal, kohya, OneTrainer,
    LyCORIS, ComfyUI; any behind PEFT's `base_model.model.`), mapped to the linears of this model."""

    def __init__(self, components: dict[str, nn.Module]) -> None:
        self.aliases: dict[str, tuple[Target, ...]] = {}
        self.weights: dict[str, nn.Parameter] = {}
        self.biases: dict[str, nn.Parameter] = {}
        for component, model in components.items():
            for name, module in model.named_modules():
                if not isinstance(module, nn.Linear):
                    continue
                key, flat = f"{component}.{name}", name.replace(".", "_")
                self.weights[key] = module.weight
                if module.bias is not None:
                    self.biases[key] = module.bias
                spellings = [key]
                if component == "transformer":
                    spellings += [name, f"lycoris_{flat}", f"lora_transformer_{flat}"]
                elif component == "text_encoder":
                    # transformers 5 dropped CLIPTextModel's `text_model.` level; LoRA files still use it.
                    for clip in {name, f"text_model.{name.removeprefix('text_model.')}"}:
                        clip_flat = clip.replace(".", "_")
                        spellings += [f"text_encoder.{clip}", f"lora_te_{clip_flat}", f"lora_te1_{clip_flat}"]
                        spellings.append(f"text_encoders.clip_l.transformer.{clip}")
                self.aliases.update(dict.fromkeys(spellings, (Target(key, 0, module.out_features),)))
        if "transformer" in components:
            for bfl_name, targets in bfl_table(components["transformer"]).items():
                flat = bfl_name.replace(".", "_")
                spellings = (bfl_name, f"diffusion_model.{bfl_name}", f"lora_unet_{flat}", f"lycoris_{flat}")
                self.aliases.update(dict.fromkeys(spellings, targets))

    def resolve(self, source_module: str) -> tuple[Target, ...] | None:
        """The targets of a module name as written in a LoRA file, or None when nothing matches."""
        return self.aliases.get(source_module.removeprefix("base_model.model."))
