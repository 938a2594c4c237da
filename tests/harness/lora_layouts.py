"""LoRA files laid out key for key as trainers write them, for FLUX.1 at any depth and width.

The architecture tables here are written by hand from BFL's `flux/model.py` and diffusers'
`FluxTransformer2DModel` (not taken from flux_day), and each writer returns, beside the file, the update
it encodes for every parameter it touches, computed independently: `(alpha/rank) · B·A` per split,
the full update for ComfyUI's `diff`, and the vector for `diff_b`. Key spellings follow each trainer's
source: ai-toolkit and SimpleTuner (diffusers `save_lora_weights`), kohya sd-scripts
(`networks/lora_flux.py`: `lora_unet_`, `lora_te1_`, T5 `lora_te3_`), OneTrainer's `lora_transformer_`
files, ComfyUI (`comfy/lora.py`: `diffusion_model.`, `text_encoders.clip_l.`, `.diff`, `.diff_b`),
XLabs (`processor.qkv_lora1`), PEFT `save_pretrained` (`base_model.model.`), fal's trainers (bare BFL
names), LyCORIS (`lycoris_`, LoKr/LoHa factors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

import torch

from tests.harness.lora_files import to_bytes

Expected = dict[str, torch.Tensor]  # parameter ("transformer.x.weight") -> float64 update at scale 1


@dataclass(frozen=True)
class FluxShape:
    """The sizes that name and shape FLUX.1's linears (the deep tree's by default)."""

    double: int = 19
    single: int = 38
    hidden: int = 32
    mlp: int = 128
    latent: int = 64  # packed latent channels in and out
    context: int = 32  # T5 width
    pooled: int = 32  # CLIP pooled width
    clip_layers: int = 12
    clip_dim: int = 32
    clip_ff: int = 37


DEEP = FluxShape()
TIME = 256  # FLUX's sinusoidal timestep (and guidance) embedding width


@cache  # tables are read many times per file; never mutated
def transformer_linears(shape: FluxShape) -> dict[str, tuple[int, int]]:
    """Every linear of diffusers' FluxTransformer2DModel (dev: with guidance): name -> (out, in)."""
    h, m = shape.hidden, shape.mlp
    linears = {
        "x_embedder": (h, shape.latent),
        "context_embedder": (h, shape.context),
        "time_text_embed.timestep_embedder.linear_1": (h, TIME),
        "time_text_embed.timestep_embedder.linear_2": (h, h),
        "time_text_embed.guidance_embedder.linear_1": (h, TIME),
        "time_text_embed.guidance_embedder.linear_2": (h, h),
        "time_text_embed.text_embedder.linear_1": (h, shape.pooled),
        "time_text_embed.text_embedder.linear_2": (h, h),
        "norm_out.linear": (2 * h, h),
        "proj_out": (shape.latent, h),
    }
    for i in range(shape.double):
        block = f"transformer_blocks.{i}"
        for name, size in {
            "norm1.linear": (6 * h, h),
            "norm1_context.linear": (6 * h, h),
            **{
                f"attn.{p}": (h, h)
                for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
            },
            "attn.to_out.0": (h, h),
            "attn.to_add_out": (h, h),
            "ff.net.0.proj": (m, h),
            "ff.net.2": (h, m),
            "ff_context.net.0.proj": (m, h),
            "ff_context.net.2": (h, m),
        }.items():
            linears[f"{block}.{name}"] = size
    for i in range(shape.single):
        block = f"single_transformer_blocks.{i}"
        linears |= {
            f"{block}.norm.linear": (3 * h, h),
            f"{block}.attn.to_q": (h, h),
            f"{block}.attn.to_k": (h, h),
            f"{block}.attn.to_v": (h, h),
            f"{block}.proj_mlp": (m, h),
            f"{block}.proj_out": (h, h + m),
        }
    return linears


@cache  # tables are read many times per file; never mutated
def bfl_modules(shape: FluxShape) -> dict[str, list[tuple[str, int, int]]]:
    """Every BFL linear: name -> [(diffusers linear, first row, end row)] in BFL's row order."""
    h, m = shape.hidden, shape.mlp
    table: dict[str, list[tuple[str, int, int]]] = {
        "img_in": [("x_embedder", 0, h)],
        "txt_in": [("context_embedder", 0, h)],
        "time_in.in_layer": [("time_text_embed.timestep_embedder.linear_1", 0, h)],
        "time_in.out_layer": [("time_text_embed.timestep_embedder.linear_2", 0, h)],
        "guidance_in.in_layer": [("time_text_embed.guidance_embedder.linear_1", 0, h)],
        "guidance_in.out_layer": [("time_text_embed.guidance_embedder.linear_2", 0, h)],
        "vector_in.in_layer": [("time_text_embed.text_embedder.linear_1", 0, h)],
        "vector_in.out_layer": [("time_text_embed.text_embedder.linear_2", 0, h)],
        "final_layer.linear": [("proj_out", 0, shape.latent)],
        # BFL's final modulation emits (shift, scale), diffusers' norm_out (scale, shift): see `rows`.
        "final_layer.adaLN_modulation.1": [("norm_out.linear", 0, 2 * h)],
    }
    for i in range(shape.double):
        d, b = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for stream, attn, proj, ff, norm in (
            ("img", ("to_q", "to_k", "to_v"), "to_out.0", "ff", "norm1"),
            ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "ff_context", "norm1_context"),
        ):
            table[f"{d}.{stream}_attn.qkv"] = [
                (f"{b}.attn.{p}", k * h, (k + 1) * h) for k, p in enumerate(attn)
            ]
            table[f"{d}.{stream}_attn.proj"] = [(f"{b}.attn.{proj}", 0, h)]
            table[f"{d}.{stream}_mlp.0"] = [(f"{b}.{ff}.net.0.proj", 0, m)]
            table[f"{d}.{stream}_mlp.2"] = [(f"{b}.{ff}.net.2", 0, h)]
            table[f"{d}.{stream}_mod.lin"] = [(f"{b}.{norm}.linear", 0, 6 * h)]
    for i in range(shape.single):
        s, b = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        table[f"{s}.linear1"] = [
            (f"{b}.attn.to_q", 0, h),
            (f"{b}.attn.to_k", h, 2 * h),
            (f"{b}.attn.to_v", 2 * h, 3 * h),
            (f"{b}.proj_mlp", 3 * h, 3 * h + m),
        ]
        table[f"{s}.linear2"] = [(f"{b}.proj_out", 0, h)]
        table[f"{s}.modulation.lin"] = [(f"{b}.norm.linear", 0, 3 * h)]
    return table


@cache  # tables are read many times per file; never mutated
def clip_linears(shape: FluxShape) -> dict[str, tuple[str, tuple[int, int]]]:
    """CLIP-L's linears as LoRA files name them (`text_model.encoder…`) -> (the loaded model's name, size).

    transformers 5's CLIPTextModel has no `text_model.` level; LoRA files keep it."""
    d, ff = shape.clip_dim, shape.clip_ff
    attention = {f"self_attn.{p}": (d, d) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    subs = {**attention, "mlp.fc1": (ff, d), "mlp.fc2": (d, ff)}
    return {
        f"text_model.encoder.layers.{i}.{sub}": (f"encoder.layers.{i}.{sub}", size)
        for i in range(shape.clip_layers)
        for sub, size in subs.items()
    }


def bfl_in_features(shape: FluxShape, name: str) -> int:
    """A BFL module's input width: that of the diffusers linear(s) holding its rows."""
    return transformer_linears(shape)[bfl_modules(shape)[name][0][0]][1]


def bfl_out_features(shape: FluxShape, name: str) -> int:
    return bfl_modules(shape)[name][-1][2]


def rows(update: torch.Tensor, name: str) -> torch.Tensor:
    """A BFL module's update (rows first) in diffusers' row order: final adaLN halves swapped."""
    if name == "final_layer.adaLN_modulation.1":
        shift, scale = update.chunk(2, dim=0)
        return torch.cat([scale, shift], dim=0)
    return update


class Factors:
    """Seeded random factors, large enough that a wrong split or scale is far outside tolerance."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, *size: int) -> torch.Tensor:
        return torch.randn(*size, generator=self.generator) * 0.1


def low_rank(
    out: dict[str, torch.Tensor],
    key: str,
    down_key: str,
    up_key: str,
    factors: Factors,
    size: tuple[int, int],
    rank: int,
    alpha: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write down/up (and alpha when given) under `key`; return (up, down) for the caller's math."""
    rows_, columns = size
    down, up = factors(rank, columns), factors(rows_, rank)
    out[f"{key}{down_key}"], out[f"{key}{up_key}"] = down, up
    if alpha is not None:
        out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return up, down


def scaled(up: torch.Tensor, down: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """(alpha/rank) · up @ down in float64; alpha None means alpha = rank."""
    rank = down.shape[0]
    return (up.double() @ down.double()) * ((alpha if alpha is not None else rank) / rank)


def add_bfl(
    expected: Expected, name: str, update: torch.Tensor, shape: FluxShape, kind: str = "weight"
) -> None:
    """Record a BFL module's update (weight rows or bias) on each diffusers linear it covers."""
    update = rows(update, name)
    for module, start, stop in bfl_modules(shape)[name]:
        expected[f"transformer.{module}.{kind}"] = update[start:stop]


def alphas(index: int, rank: int) -> float:
    """A different alpha per module (kohya files often vary them), never equal to the rank."""
    return float(rank * (1 + index % 3)) / 2 + 0.5


# -- The writers: (file bytes, expected updates) ---------------------------------------------------


def ai_toolkit(shape: FluxShape = DEEP, seed: int = 0, rank: int = 2) -> tuple[bytes, Expected]:
    """ai-toolkit: diffusers names under `transformer.`, lora_A/lora_B, no alpha (scale 1)."""
    f, out, expected = Factors(seed), {}, {}
    for name, size in transformer_linears(shape).items():
        up, down = low_rank(
            out, f"transformer.{name}", ".lora_A.weight", ".lora_B.weight", f, size, rank, None
        )
        expected[f"transformer.{name}.weight"] = scaled(up, down, None)
    return to_bytes(out), expected


def simpletuner(shape: FluxShape = DEEP, seed: int = 0, rank: int = 4) -> tuple[bytes, Expected]:
    """SimpleTuner (PEFT through diffusers' save_lora_weights): alpha in `lora_adapter_metadata`,
    one `alpha_pattern` override, as PEFT writes them."""
    f, out, expected = Factors(seed), {}, {}
    alpha, pattern = 8.0, {"proj_mlp": 2.0}
    for name, size in transformer_linears(shape).items():
        up, down = low_rank(
            out, f"transformer.{name}", ".lora_A.weight", ".lora_B.weight", f, size, rank, None
        )
        module_alpha = pattern["proj_mlp"] if name.endswith("proj_mlp") else alpha
        expected[f"transformer.{name}.weight"] = scaled(up, down, module_alpha)
    metadata = {
        "transformer.r": rank,
        "transformer.lora_alpha": alpha,
        "transformer.alpha_pattern": pattern,
        "transformer.target_modules": sorted({n.rsplit(".", 1)[-1] for n in transformer_linears(shape)}),
        "transformer.use_rslora": False,
    }
    return to_bytes(out, {"lora_adapter_metadata": json.dumps(metadata, sort_keys=True)}), expected


def kohya(
    shape: FluxShape = DEEP, seed: int = 0, rank: int = 2, text_encoder: bool = True, split_qkv: bool = False
) -> tuple[bytes, Expected]:
    """kohya sd-scripts: `lora_unet_<BFL name, dots as _>` for every BFL linear (blocks and, with
    `in_dims`, the input layers), `lora_te1_` for CLIP; lora_down/lora_up and an alpha per module.
    `split_qkv` trains q, k, v (and the MLP input) apart and saves them fused, as kohya's `state_dict`
    does: the down matrices stacked, the up matrix block-diagonal."""
    f, out, expected = Factors(seed), {}, {}
    for i, name in enumerate(bfl_modules(shape)):
        key = "lora_unet_" + name.replace(".", "_")
        columns, alpha = bfl_in_features(shape, name), alphas(i, rank)
        parts = bfl_modules(shape)[name]
        if split_qkv and len(parts) > 1:
            downs = [f(rank, columns) for _ in parts]
            up = torch.zeros(parts[-1][2], rank * len(parts))
            for k, (_, start, stop) in enumerate(parts):
                up[start:stop, k * rank : (k + 1) * rank] = f(stop - start, rank)
            down = torch.cat(downs)
            out |= {
                f"{key}.lora_down.weight": down,
                f"{key}.lora_up.weight": up,
                f"{key}.alpha": torch.tensor(alpha),
            }
        else:
            up, down = low_rank(
                out, key, ".lora_down.weight", ".lora_up.weight", f, (parts[-1][2], columns), rank, alpha
            )
        add_bfl(expected, name, scaled(up, down, alpha), shape)
    if text_encoder:
        for i, (name, (model_name, size)) in enumerate(clip_linears(shape).items()):
            key = "lora_te1_" + name.replace(".", "_")
            alpha = alphas(i, rank)
            up, down = low_rank(out, key, ".lora_down.weight", ".lora_up.weight", f, size, rank, alpha)
            expected[f"text_encoder.{model_name}.weight"] = scaled(up, down, alpha)
    return to_bytes(out), expected


def kohya_t5(shape: FluxShape = DEEP, seed: int = 0) -> bytes:
    """A kohya file trained with `train_t5xxl`: T5 modules under `lora_te3_` beside the transformer's."""
    data, _ = kohya(shape, seed, text_encoder=True)
    from safetensors.torch import load

    state_dict = load(data)
    f = Factors(seed + 1)
    for sub in ("SelfAttention_q", "SelfAttention_k", "SelfAttention_v", "SelfAttention_o"):
        key = f"lora_te3_encoder_block_0_layer_0_{sub}"
        state_dict |= {
            f"{key}.lora_down.weight": f(2, shape.context),
            f"{key}.lora_up.weight": f(shape.context, 2),
            f"{key}.alpha": torch.tensor(1.0),
        }
    return to_bytes(state_dict)


def onetrainer(
    shape: FluxShape = DEEP, seed: int = 0, rank: int = 2, text_encoder: bool = False
) -> tuple[bytes, Expected]:
    """OneTrainer's `lora_transformer_<diffusers name, dots as _>` files (lora_down/lora_up/alpha), with or
    without its CLIP LoRA under `lora_te1_`."""
    f, out, expected = Factors(seed), {}, {}
    for i, (name, size) in enumerate(transformer_linears(shape).items()):
        key, alpha = "lora_transformer_" + name.replace(".", "_"), alphas(i, rank)
        up, down = low_rank(out, key, ".lora_down.weight", ".lora_up.weight", f, size, rank, alpha)
        expected[f"transformer.{name}.weight"] = scaled(up, down, alpha)
    if text_encoder:
        for name, (model_name, size) in clip_linears(shape).items():
            key = "lora_te1_" + name.replace(".", "_")
            up, down = low_rank(out, key, ".lora_down.weight", ".lora_up.weight", f, size, rank, 1.0)
            expected[f"text_encoder.{model_name}.weight"] = scaled(up, down, 1.0)
    return to_bytes(out), expected


def comfyui(shape: FluxShape = DEEP, seed: int = 0, rank: int = 2) -> tuple[bytes, Expected]:
    """ComfyUI: BFL names under `diffusion_model.` (lora_up/lora_down/alpha), CLIP under
    `text_encoders.clip_l.transformer.`; a full weight update (`.diff`) for the input and output layers
    and a bias update (`.diff_b`) for every module, as its LoRA extractor writes them."""
    f, out, expected = Factors(seed), {}, {}
    full = {"img_in", "txt_in", "final_layer.linear", "final_layer.adaLN_modulation.1"}
    for i, name in enumerate(bfl_modules(shape)):
        key, size = f"diffusion_model.{name}", (bfl_out_features(shape, name), bfl_in_features(shape, name))
        if name in full:
            out[f"{key}.diff"] = f(*size)
            add_bfl(expected, name, out[f"{key}.diff"].double(), shape)
        else:
            alpha = alphas(i, rank)
            up, down = low_rank(out, key, ".lora_down.weight", ".lora_up.weight", f, size, rank, alpha)
            add_bfl(expected, name, scaled(up, down, alpha), shape)
        out[f"{key}.diff_b"] = f(size[0])
        add_bfl(expected, name, out[f"{key}.diff_b"].double(), shape, kind="bias")
    for name, (model_name, size) in clip_linears(shape).items():
        key = f"text_encoders.clip_l.transformer.{name}"
        up, down = low_rank(out, key, ".lora_down.weight", ".lora_up.weight", f, size, rank, 4.0)
        expected[f"text_encoder.{model_name}.weight"] = scaled(up, down, 4.0)
        out[f"{key}.diff_b"] = f(size[0])
        expected[f"text_encoder.{model_name}.bias"] = out[f"{key}.diff_b"].double()
    return to_bytes(out), expected


def xlabs(shape: FluxShape = DEEP, seed: int = 0, rank: int = 2) -> tuple[bytes, Expected]:
    """XLabs: `processor.qkv_lora1/proj_lora1` (image stream) and `qkv_lora2/proj_lora2` (text stream) in
    every double block, `qkv_lora/proj_lora` in every single block; down/up, no alpha."""
    f, out, expected = Factors(seed), {}, {}
    h, m = shape.hidden, shape.mlp
    for i in range(shape.double):
        for lora, bfl in (
            ("qkv_lora1", "img_attn.qkv"),
            ("proj_lora1", "img_attn.proj"),
            ("qkv_lora2", "txt_attn.qkv"),
            ("proj_lora2", "txt_attn.proj"),
        ):
            name = f"double_blocks.{i}.{bfl}"
            key = f"double_blocks.{i}.processor.{lora}"
            up, down = low_rank(
                out, key, ".down.weight", ".up.weight", f, (bfl_out_features(shape, name), h), rank, None
            )
            add_bfl(expected, name, scaled(up, down, None), shape)
    for i in range(shape.single):
        key = f"single_blocks.{i}.processor"
        up, down = low_rank(out, f"{key}.qkv_lora", ".down.weight", ".up.weight", f, (3 * h, h), rank, None)
        for k, q in enumerate(("to_q", "to_k", "to_v")):
            expected[f"transformer.single_transformer_blocks.{i}.attn.{q}.weight"] = scaled(up, down, None)[
                k * h : (k + 1) * h
            ]
        up, down = low_rank(out, f"{key}.proj_lora", ".down.weight", ".up.weight", f, (h, h + m), rank, None)
        expected[f"transformer.single_transformer_blocks.{i}.proj_out.weight"] = scaled(up, down, None)
    return to_bytes(out), expected


def peft_adapter(shape: FluxShape = DEEP, seed: int = 0, rank: int = 2) -> tuple[bytes, Expected]:
    """PEFT's `PeftModel.save_pretrained` adapter_model.safetensors: `base_model.model.<diffusers name>`,
    lora_A/lora_B; alpha lives in adapter_config.json, which a LoRA URL does not carry (alpha = rank)."""
    f, out, expected = Factors(seed), {}, {}
    for name, size in transformer_linears(shape).items():
        key = f"base_model.model.{name}"
        up, down = low_rank(out, key, ".lora_A.weight", ".lora_B.weight", f, size, rank, None)
        expected[f"transformer.{name}.weight"] = scaled(up, down, None)
    return to_bytes(out), expected


def fal(shape: FluxShape = DEEP, seed: int = 0, rank: int = 2, prefix: str = "") -> tuple[bytes, Expected]:
    """fal's trainers: bare BFL names (`double_blocks.0.img_attn.qkv`), or behind `base_model.model.`;
    lora_A/lora_B, no alpha."""
    f, out, expected = Factors(seed), {}, {}
    for name in bfl_modules(shape):
        size = (bfl_out_features(shape, name), bfl_in_features(shape, name))
        up, down = low_rank(out, f"{prefix}{name}", ".lora_A.weight", ".lora_B.weight", f, size, rank, None)
        add_bfl(expected, name, scaled(up, down, None), shape)
    return to_bytes(out), expected


def lycoris(shape: FluxShape = DEEP, seed: int = 0, naming: str = "lycoris") -> tuple[bytes, Expected]:
    """LyCORIS on every transformer linear, cycling LoKr (full w1 and w2), LoKr (low-rank w2) and LoHa.
    `naming` "lycoris" spells diffusers names as SimpleTuner's LyCORIS wrapper does (`lycoris_<name>`),
    "kohya" spells BFL names (`lora_unet_<name>`), as kohya-trained LyCORIS files do."""
    f, out, expected = Factors(seed), {}, {}
    if naming == "lycoris":
        modules = {
            f"lycoris_{n.replace('.', '_')}": (size, n) for n, size in transformer_linears(shape).items()
        }
    else:
        modules = {
            f"lora_unet_{n.replace('.', '_')}": ((bfl_out_features(shape, n), bfl_in_features(shape, n)), n)
            for n in bfl_modules(shape)
        }
    for i, (key, ((rows_, columns), name)) in enumerate(modules.items()):
        kind = i % 3
        if kind == 0:  # LoKr, both factors full: no alpha scaling
            w1, w2 = f(4, 4), f(rows_ // 4, columns // 4)
            out |= {f"{key}.lokr_w1": w1, f"{key}.lokr_w2": w2, f"{key}.alpha": torch.tensor(3.0)}
            full = torch.kron(w1.double(), w2.double())
        elif kind == 1:  # LoKr, w2 = w2_a @ w2_b: alpha / rank(w2_b) applies
            w1, w2_a, w2_b = f(4, 4), f(rows_ // 4, 2), f(2, columns // 4)
            out |= {f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2_a, f"{key}.lokr_w2_b": w2_b}
            out[f"{key}.alpha"] = torch.tensor(3.0)
            full = torch.kron(w1.double(), w2_a.double() @ w2_b.double()) * (3.0 / 2)
        else:  # LoHa: (w1_a w1_b) ⊙ (w2_a w2_b) · alpha/rank
            a1, b1, a2, b2 = f(rows_, 2), f(2, columns), f(rows_, 2), f(2, columns)
            out |= {
                f"{key}.hada_w1_a": a1,
                f"{key}.hada_w1_b": b1,
                f"{key}.hada_w2_a": a2,
                f"{key}.hada_w2_b": b2,
            }
            out[f"{key}.alpha"] = torch.tensor(1.0)
            full = (a1.double() @ b1.double()) * (a2.double() @ b2.double()) * (1.0 / 2)
        if naming == "lycoris":
            expected[f"transformer.{name}.weight"] = full
        else:
            add_bfl(expected, name, full, shape)
    return to_bytes(out), expected


def with_dora(data: bytes, key: str) -> bytes:
    """`data` with a DoRA magnitude vector added under `key` (kohya/OneTrainer `dora_scale`, PEFT
    `lora_magnitude_vector`)."""
    from safetensors.torch import load

    return to_bytes(load(data) | {key: torch.ones(1, 32)})


def control_lora(shape: FluxShape = DEEP, seed: int = 0, diffusers_names: bool = False) -> bytes:
    """A FLUX.1 Canny/Depth Control LoRA: the input projection takes twice the latent channels (the
    control image's latents beside the noise), and the QK norms are trained in full."""
    f = Factors(seed)
    if diffusers_names:
        return to_bytes(
            {
                "transformer.x_embedder.lora_A.weight": f(2, 2 * shape.latent),
                "transformer.x_embedder.lora_B.weight": f(shape.hidden, 2),
                "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": f(2, shape.hidden),
                "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": f(shape.hidden, 2),
            }
        )
    return to_bytes(
        {
            "img_in.lora_A.weight": f(2, 2 * shape.latent),
            "img_in.lora_B.weight": f(shape.hidden, 2),
            "double_blocks.0.img_attn.norm.query_norm.scale": f(shape.hidden // 2),
            "double_blocks.0.img_attn.qkv.lora_A.weight": f(2, shape.hidden),
            "double_blocks.0.img_attn.qkv.lora_B.weight": f(3 * shape.hidden, 2),
        }
    )
