"""Random FLUX-architecture models (the real architecture, random weights), one set of profiles:

- **tiny** (a few MB): the test suite and the README's demo.
- **wide** (GBs): FLUX.1's real layer widths (3072 hidden, 24 heads of 128, MLP x4, T5 width 4096,
  CLIP-L width 768, FLUX's VAE) with 1 double and 2 single blocks, so per-weight costs (LoRA fuses,
  fp8 quantization, setup) are measured at real sizes on a CPU. Written in float32, the CPU
  engine's dtype, so loading it converts nothing, as bf16 files on a GPU. Benchmarks only.
- **deep**: FLUX.1's real depth (19 double + 38 single blocks, a 12-layer CLIP) at narrow widths,
  so LoRA files laid out key for key as trainers write them can be checked module by module.
- **full**: FLUX.1 itself (11.9 B parameters per transformer, T5-XXL, CLIP-L, the real safety
  models' sizes): built in GPU memory by the GPU proof, or on the meta device to size the memory plan.

Same profile and seed, same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from flux_day.models import MODELS
from scripts.random_weights.safety import safety_models
from scripts.random_weights.tokenizers import clip_tokenizer, t5_tokenizer

if TYPE_CHECKING:
    from flux_day.pipelines import FluxModels
    from flux_day.safety import SafetyFilter


@dataclass(frozen=True)
class TreeProfile:
    """The sizes that distinguish one random tree from another (the architecture is always FLUX.1's)."""

    name: str
    double_blocks: int
    single_blocks: int
    heads: int
    head_dim: int
    rope_axes: tuple[int, int, int]  # sums to head_dim, as FLUX's (16, 56, 56) sums to 128
    t5_dim: int
    t5_ff: int
    t5_layers: int
    t5_heads: int
    clip_dim: int
    clip_ff: int
    clip_layers: int
    clip_heads: int
    vae_channels: tuple[int, int, int, int]
    vae_layers_per_block: int
    vae_norm_groups: int
    disk_dtype: torch.dtype = torch.bfloat16  # real FLUX checkpoints are bf16 on disk
    t5_vocab: int | None = None  # None: the tiny tokenizer's; FLUX's T5-XXL has 32128
    clip_vocab: int | None = None  # None: the tiny tokenizer's; CLIP-L has 49408
    safety: str = "tiny"  # "full": the CompVis checker's ViT-L/14 and Falconsai's ViT-base

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


PROFILES: Final[dict[str, TreeProfile]] = {
    "tiny": TreeProfile("tiny", 2, 2, 2, 16, (4, 6, 6), 32, 37, 2, 4, 32, 37, 2, 4, (8, 16, 16, 16), 1, 4),
    # FLUX.1's widths: 24 heads of 128, T5-XXL's 4096/10240 with 64 heads, CLIP-L's 768/3072, and
    # FLUX's own VAE; one T5 and one CLIP layer, since encoders run once per request.
    "wide": TreeProfile(
        "wide",
        *(1, 2, 24, 128, (16, 56, 56)),
        *(4096, 10240, 1, 64, 768, 3072, 1, 12),
        *((128, 256, 512, 512), 2, 32),
        disk_dtype=torch.float32,
    ),
    # FLUX.1's depth and CLIP-L's 12 layers, at tiny widths.
    "deep": TreeProfile("deep", 19, 38, 2, 16, (4, 6, 6), 32, 37, 2, 4, 32, 37, 12, 4, (8, 16, 16, 16), 1, 4),
    "full": TreeProfile(
        "full",
        *(19, 38, 24, 128, (16, 56, 56)),
        *(4096, 10240, 24, 64, 768, 3072, 12, 12),
        *((128, 256, 512, 512), 2, 32),
        t5_vocab=32128,
        clip_vocab=49408,
        safety="full",
    ),
}


def transformer_config(profile: TreeProfile, guidance_embeds: bool) -> dict[str, object]:
    """`FluxTransformer2DModel` arguments for `profile` (the GPU proof builds full size from FLUX's own)."""
    return {
        "patch_size": 1,
        "in_channels": 64,  # 16 latent channels packed 2x2, as in FLUX.1
        "num_layers": profile.double_blocks,
        "num_single_layers": profile.single_blocks,
        "attention_head_dim": profile.head_dim,
        "num_attention_heads": profile.heads,
        "joint_attention_dim": profile.t5_dim,
        "pooled_projection_dim": profile.clip_dim,
        "guidance_embeds": guidance_embeds,
        "axes_dims_rope": profile.rope_axes,
    }


def transformer(profile: TreeProfile, guidance_embeds: bool) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(**transformer_config(profile, guidance_embeds))


def vae(profile: TreeProfile) -> AutoencoderKL:
    # Four blocks give FLUX's 8x spatial compression; scaling and shift are FLUX.1's own.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=profile.vae_channels,
        layers_per_block=profile.vae_layers_per_block,
        latent_channels=16,
        norm_num_groups=profile.vae_norm_groups,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def text_encoders(
    profile: TreeProfile, clip_tok: CLIPTokenizer, t5_tok: T5Tokenizer
) -> tuple[CLIPTextModel, T5EncoderModel]:
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=profile.clip_vocab or len(clip_tok),
            hidden_size=profile.clip_dim,
            intermediate_size=profile.clip_ff,
            num_attention_heads=profile.clip_heads,
            num_hidden_layers=profile.clip_layers,
            max_position_embeddings=77,
            projection_dim=profile.clip_dim,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=profile.t5_vocab or len(t5_tok),
            d_model=profile.t5_dim,
            d_kv=profile.t5_dim // profile.t5_heads,
            d_ff=profile.t5_ff,
            num_layers=profile.t5_layers,
            num_heads=profile.t5_heads,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's T5-XXL
            relative_attention_num_buckets=32 if profile.t5_vocab else 8,
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
        )
    )
    return clip, t5


def build_models(
    profile: TreeProfile, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[FluxModels, SafetyFilter]:
    """Every model the engine runs, with random weights of `profile`, made directly on `device` in
    `dtype` (a full-size transformer made in float32 first would need 48 GB): no disk, no download.
    The engine takes them through the same setup path as weights read from a tree."""
    from flux_day.pipelines import FluxModels
    from flux_day.safety import SafetyFilter

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
            clip, t5 = text_encoders(profile, clip_tok, t5_tok)
            transformers = {
                name: transformer(profile, guidance_embeds=spec.guidance_embeds).eval()
                for name, spec in MODELS.items()
            }
            shared = {
                "vae": vae(profile).eval(),
                "text_encoder": clip.eval(),
                "text_encoder_2": t5.eval(),
                "tokenizer": clip_tok,
                "tokenizer_2": t5_tok,
            }
            checker, checker_processor, classifier, classifier_processor = safety_models(
                profile.safety == "full"
            )
    finally:
        torch.set_default_dtype(previous)
    schedulers = {name: FlowMatchEulerDiscreteScheduler(**spec.scheduler) for name, spec in MODELS.items()}
    safety = SafetyFilter.from_modules(checker, checker_processor, classifier.eval(), classifier_processor)
    return FluxModels(transformers, schedulers, shared), safety
