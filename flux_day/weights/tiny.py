"""Tiny random FLUX-architecture weights, written in the real layout so every loading path is real.

Real FLUX weights cannot be downloaded on our machines, so the demo and the tests run on models with
the real architecture (double and single blocks, guidance embedding, 16-channel VAE with FLUX's
scaling and shift, CLIP + T5 encoders, tokenizers) at a few MB. Same seed, same bytes.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.utils import logging as diffusers_logging
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)
from transformers.utils import logging as transformers_logging

from flux_day.weights.layout import (
    DEV_FOLDER,
    NSFW_CLASSIFIER_FOLDER,
    SAFETY_CHECKER_FOLDER,
    SCHNELL_FOLDER,
)

# Words the tokenizers know as whole pieces; everything else falls back to characters.
_WORDS = (
    "a",
    "photo",
    "of",
    "the",
    "an",
    "in",
    "on",
    "with",
    "and",
    "red",
    "blue",
    "green",
    "fox",
    "cat",
    "dog",
    "tree",
    "snow",
    "city",
    "night",
    "day",
    "portrait",
    "painting",
    "style",
    "mountain",
    "river",
    "sky",
    "sun",
    "light",
    "dark",
    "house",
    "car",
    "person",
    "woman",
    "man",
)

# FLUX.1's real scheduler configs (dev shifts its timesteps with the image size; schnell does not).
_SCHEDULERS = {
    DEV_FOLDER: {"shift": 3.0, "use_dynamic_shifting": True},
    SCHNELL_FOLDER: {"shift": 1.0, "use_dynamic_shifting": False},
}

_T5_DIM = 32
_CLIP_DIM = 32


def _clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE like CLIP's: every byte as a piece (and with `</w>`), plus whole words."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for piece in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(piece, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        # Merge left to right: ("f", "o"), ("fo", "x</w>") builds "fox</w>" from its characters.
        current = word[0]
        for i, ch in enumerate(word[1:], start=1):
            nxt = ch + ("</w>" if i == len(word) - 1 else "")
            merge = (current, nxt)
            current += nxt
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(current, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer() -> T5Tokenizer:
    """A Unigram tokenizer like T5's sentencepiece: whole words first, then single characters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -3.0) for w in _WORDS]
    pieces += [(c, -8.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _transformer(guidance_embeds: bool) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2, as in FLUX.1
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_DIM,
        pooled_projection_dim=_CLIP_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )


def _vae() -> AutoencoderKL:
    # Four blocks give FLUX's 8x spatial compression; scaling and shift are FLUX.1's own.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _text_encoders(clip_tok: CLIPTokenizer, t5_tok: T5Tokenizer) -> tuple[CLIPTextModel, T5EncoderModel]:
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=_CLIP_DIM,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            projection_dim=_CLIP_DIM,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=_T5_DIM,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
        )
    )
    return clip, t5


def _write_safety_models(root: Path) -> None:
    """Tiny stand-ins for the CompVis checker and Falconsai classifier that pass ordinary images.

    The checker flags when cosine similarity exceeds a concept's threshold; thresholds of 1.0 are
    never exceeded. The classifier's bias favours `normal`. Tests lower these to make them flag.
    """
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    text = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 100,
        "bos_token_id": 0,
        "eos_token_id": 2,
    }
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    )
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(1.0)
        checker.special_care_embeds_weights.fill_(1.0)
    checker.save_pretrained(root / SAFETY_CHECKER_FOLDER)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / SAFETY_CHECKER_FOLDER
    )

    classifier = ViTForImageClassification(
        ViTConfig(
            **vision,
            num_labels=2,
            id2label={0: "normal", 1: "nsfw"},
            label2id={"normal": 0, "nsfw": 1},
        )
    )
    with torch.no_grad():
        classifier.classifier.bias.copy_(torch.tensor([10.0, -10.0]))
    classifier.save_pretrained(root / NSFW_CLASSIFIER_FOLDER)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / NSFW_CLASSIFIER_FOLDER)


def write_tiny_weights(root: Path, seed: int = 0) -> Path:
    """Write the whole weights layout under `root` with tiny random models; return `root`."""
    from diffusers import FluxPipeline

    root = Path(root)
    # The libraries warn about casting fresh random models to bf16; nothing to act on here.
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    torch.manual_seed(seed)
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    clip, t5 = _text_encoders(clip_tok, t5_tok)
    dev = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULERS[DEV_FOLDER]),
        vae=_vae(),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=_transformer(guidance_embeds=True),
    )
    # Real FLUX checkpoints are bf16 on disk; the tiny ones are too, so loading converts as it must.
    dev.to(torch.bfloat16)
    dev.save_pretrained(root / DEV_FOLDER)

    # schnell ships only what differs from dev; everything else is shared at load time.
    schnell_transformer = _transformer(guidance_embeds=False).to(torch.bfloat16)
    schnell_transformer.save_pretrained(root / SCHNELL_FOLDER / "transformer")
    FlowMatchEulerDiscreteScheduler(**_SCHEDULERS[SCHNELL_FOLDER]).save_pretrained(
        root / SCHNELL_FOLDER / "scheduler"
    )
    _write_safety_models(root)
    return root
