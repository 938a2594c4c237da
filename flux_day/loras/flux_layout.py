"""Where each module of the original (BFL) FLUX layout lives in diffusers' `FluxTransformer2DModel`.

BFL checkpoints and kohya LoRAs name modules as BFL does (`double_blocks.0.img_attn.qkv`,
`single_blocks.3.linear1`), where q, k, v (and, in single blocks, the MLP input) are one fused linear;
diffusers has a separate linear for each. diffusers 0.42.1's converters cover kohya and fal names only
for full-size FLUX (widths 3072/12288 are hard-coded) and BFL `diffusion_model.*.lora_A/B` names not at
all, so this table, built from the loaded model's own shapes, is the one place that splits fused rows.
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
    """Every spelling of a module name that FLUX LoRA files use, mapped to the linears of this model.

    Spellings: diffusers (`transformer.x.y`, or bare), BFL (`diffusion_model.double_blocks.0.…`, or bare
    as fal's trainers write it), kohya (`lora_unet_…`, `lora_te1_…`), OneTrainer and LyCORIS
    (`lora_transformer_…`, `lycoris_…`) and ComfyUI's text encoder (`text_encoders.clip_l.transformer.…`);
    any of them behind PEFT's `base_model.model.`. Every spelling is built from the loaded model's own
    shapes, so no width is assumed.
    """

    def __init__(self, components: dict[str, nn.Module]) -> None:
        self.aliases: dict[str, tuple[Target, ...]] = {}
        self.weights: dict[str, nn.Parameter] = {}
        self.biases: dict[str, nn.Parameter] = {}
        for component, model in components.items():
            for name, module in model.named_modules():
                if not isinstance(module, nn.Linear):
                    continue
                self.weights[f"{component}.{name}"] = module.weight
                if module.bias is not None:
                    self.biases[f"{component}.{name}"] = module.bias
                whole = (Target(f"{component}.{name}", 0, module.out_features),)
                flat = name.replace(".", "_")
                spellings = [f"{component}.{name}"]
                if component == "transformer":
                    spellings += [name, f"lycoris_{flat}", f"lora_transformer_{flat}"]
                elif component == "text_encoder":
                    # transformers 5 dropped CLIPTextModel's `text_model.` level; LoRA files still use it.
                    for clip_name in {name, f"text_model.{name.removeprefix('text_model.')}"}:
                        clip_flat = clip_name.replace(".", "_")
                        spellings += [
                            f"text_encoder.{clip_name}",
                            f"lora_te_{clip_flat}",
                            f"lora_te1_{clip_flat}",
                            f"text_encoders.clip_l.transformer.{clip_name}",
                        ]
                self.aliases.update(dict.fromkeys(spellings, whole))
        if "transformer" in components:
            for bfl_name, targets in bfl_table(components["transformer"]).items():
                flat = bfl_name.replace(".", "_")
                spellings = (bfl_name, f"diffusion_model.{bfl_name}", f"lora_unet_{flat}", f"lycoris_{flat}")
                self.aliases.update(dict.fromkeys(spellings, targets))

    def resolve(self, source_module: str) -> tuple[Target, ...] | None:
        """The targets of a module name as written in a LoRA file, or None when nothing matches."""
        return self.aliases.get(source_module.removeprefix("base_model.model."))
