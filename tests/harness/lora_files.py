"""LoRA files for tests: one set of random factors written in every layout FLUX LoRAs ship in.

The mapping below, from BFL module names to the tiny model's diffusers linears and their rows, is
written out by hand from the FLUX architecture (not taken from flux_day), so the fused weights the
tests expect come from independent math: W + s · (alpha/rank) · up[rows] @ down.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import torch
from safetensors.torch import save

# A small, fast, lossless request for comparing images of LoRAs byte for byte through the server.
FAST = {
    "prompt": "a fox",
    "num_inference_steps": 2,
    "megapixels": "0.25",
    "aspect_ratio": "1:1",
    "output_format": "png",
    "seed": 7,
}
D, MLP = 32, 128  # the tiny model's joint width and MLP width
# BFL name -> [(diffusers module, first row, last row)]
TINY_LAYOUT: dict[str, list[tuple[str, int, int]]] = {
    "double_blocks.0.img_attn.qkv": [
        ("transformer_blocks.0.attn.to_q", 0, D),
        ("transformer_blocks.0.attn.to_k", D, 2 * D),
        ("transformer_blocks.0.attn.to_v", 2 * D, 3 * D),
    ],
    "double_blocks.1.txt_attn.qkv": [
        ("transformer_blocks.1.attn.add_q_proj", 0, D),
        ("transformer_blocks.1.attn.add_k_proj", D, 2 * D),
        ("transformer_blocks.1.attn.add_v_proj", 2 * D, 3 * D),
    ],
    "double_blocks.0.img_attn.proj": [("transformer_blocks.0.attn.to_out.0", 0, D)],
    "double_blocks.1.txt_mlp.2": [("transformer_blocks.1.ff_context.net.2", 0, D)],
    "single_blocks.1.linear1": [
        ("single_transformer_blocks.1.attn.to_q", 0, D),
        ("single_transformer_blocks.1.attn.to_k", D, 2 * D),
        ("single_transformer_blocks.1.attn.to_v", 2 * D, 3 * D),
        ("single_transformer_blocks.1.proj_mlp", 3 * D, 3 * D + MLP),
    ],
    "single_blocks.0.linear2": [("single_transformer_blocks.0.proj_out", 0, D)],
}
IN_FEATURES = {"double_blocks.1.txt_mlp.2": MLP, "single_blocks.0.linear2": D + MLP}


@dataclass(frozen=True)
class Factors:
    """One BFL module's LoRA: down [rank, in], up [rows, rank], alpha."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float


def random_lora(seed: int, rank: int = 4, alpha: float = 8.0, modules: tuple[str, ...] | None = None):
    """Random factors (large enough to change an image) for `modules` of the tiny transformer."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for name in modules or tuple(TINY_LAYOUT):
        rows = TINY_LAYOUT[name][-1][2]
        down = torch.randn(rank, IN_FEATURES.get(name, D), generator=generator) * 0.3
        up = torch.randn(rows, rank, generator=generator) * 0.3
        lora[name] = Factors(down, up, alpha)
    return lora


def expected_weights(
    base: dict[str, torch.Tensor], loras: list[tuple[dict, float]]
) -> dict[str, torch.Tensor]:
    """W + Σ s · (alpha/rank) · up[rows] @ down for every diffusers linear the LoRAs touch (float64)."""
    result: dict[str, torch.Tensor] = {}
    for lora, scale in loras:
        for name, factors in lora.items():
            rank = factors.down.shape[0]
            for module, start, stop in TINY_LAYOUT[name]:
                delta = (factors.up[start:stop].double() @ factors.down.double()) * (factors.alpha / rank)
                result[module] = result.get(module, base[module].double()) + scale * delta
    return result


def kohya(lora: dict[str, Factors]) -> dict[str, torch.Tensor]:
    """kohya sd-scripts layout: lora_unet_<bfl name with underscores>.lora_down/lora_up/alpha."""
    out = {}
    for name, f in lora.items():
        key = "lora_unet_" + name.replace(".", "_")
        out |= {
            f"{key}.lora_down.weight": f.down,
            f"{key}.lora_up.weight": f.up,
            f"{key}.alpha": torch.tensor(f.alpha),
        }
    return out


def bfl(lora: dict[str, Factors]) -> dict[str, torch.Tensor]:
    """BFL layout: diffusion_model.<bfl name>.lora_A/lora_B, alpha as a key."""
    out = {}
    for name, f in lora.items():
        key = f"diffusion_model.{name}"
        out |= {
            f"{key}.lora_A.weight": f.down,
            f"{key}.lora_B.weight": f.up,
            f"{key}.alpha": torch.tensor(f.alpha),
        }
    return out


def peft(
    lora: dict[str, Factors], prefix: str = "transformer."
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers/PEFT layout (as `save_lora_weights` writes it): one A/B pair per diffusers linear,
    alpha in the adapter metadata. A fused BFL module becomes one pair per split, sharing A."""
    out = {}
    alphas = {f.alpha for f in lora.values()}
    ranks = {f.down.shape[0] for f in lora.values()}
    assert len(alphas) == 1 and len(ranks) == 1, "one alpha and rank per file in this layout"
    for name, f in lora.items():
        for module, start, stop in TINY_LAYOUT[name]:
            out[f"{prefix}{module}.lora_A.weight"] = f.down.clone()
            out[f"{prefix}{module}.lora_B.weight"] = f.up[start:stop].clone()
    metadata = {"transformer.lora_alpha": alphas.pop(), "transformer.r": ranks.pop()}
    return out, {"lora_adapter_metadata": json.dumps(metadata)}


def ai_toolkit(lora: dict[str, Factors]) -> dict[str, torch.Tensor]:
    """ai-toolkit layout: PEFT keys with the transformer. prefix and alpha baked in (alpha = rank)."""
    out = {}
    for name, f in lora.items():
        rank = f.down.shape[0]
        for module, start, stop in TINY_LAYOUT[name]:
            out[f"transformer.{module}.lora_A.weight"] = f.down * (f.alpha / rank)
            out[f"transformer.{module}.lora_B.weight"] = f.up[start:stop].clone()
    return out


def to_bytes(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A .safetensors file's bytes."""
    return save({k: v.contiguous() for k, v in state_dict.items()}, metadata=metadata)


def data_uri(data: bytes) -> str:
    """`data` as a base64 data: URI, as a user would paste it."""
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()
