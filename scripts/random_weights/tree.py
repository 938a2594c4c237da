"""Random FLUX-architecture weight trees on disk, in the real layout, so every loading path is real.
Same profile and seed, same bytes."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from flux_day.models import MODELS
from flux_day.weights.manifest import NSFW_CLASSIFIER_FOLDER, SAFETY_CHECKER_FOLDER
from scripts.random_weights.models import PROFILES, text_encoders, transformer, vae
from scripts.random_weights.safety import safety_models
from scripts.random_weights.tokenizers import clip_tokenizer, t5_tokenizer


def _write_safety_models(root: Path) -> None:
    checker, checker_processor, classifier, classifier_processor = safety_models(full=False)
    checker.save_pretrained(root / SAFETY_CHECKER_FOLDER)
    checker_processor.save_pretrained(root / SAFETY_CHECKER_FOLDER)
    classifier.save_pretrained(root / NSFW_CLASSIFIER_FOLDER)
    classifier_processor.save_pretrained(root / NSFW_CLASSIFIER_FOLDER)


def write_tiny_weights(root: Path, seed: int = 0, profile: str = "tiny") -> Path:
    """Write the whole weights layout under `root` with random models of `profile` (see PROFILES)."""
    from diffusers import FluxPipeline

    root = Path(root)
    # The libraries warn about casting fresh random models to bf16; nothing to act on here.
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    torch.manual_seed(seed)
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    sizes = PROFILES[profile]
    if profile == "full":
        raise ValueError("the full-size profile is built in memory (the GPU proof), never written")
    clip, t5 = text_encoders(sizes, clip_tok, t5_tok)
    dev = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**MODELS["dev"].scheduler),
        vae=vae(sizes),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer(sizes, guidance_embeds=MODELS["dev"].guidance_embeds),
    )
    # Real FLUX checkpoints are bf16 on disk, and so are the tiny ones, so loading converts as it must;
    # the wide tree is float32, what the CPU engine computes in, as bf16 files are for a GPU.
    dev.to(sizes.disk_dtype)
    dev.save_pretrained(root / MODELS["dev"].folder)

    # schnell ships only what differs from dev; everything else is shared at load time.
    del dev  # a wide tree's dev pipeline is GBs: free it before schnell's transformer is made
    schnell_transformer = transformer(sizes, MODELS["schnell"].guidance_embeds).to(sizes.disk_dtype)
    schnell = MODELS["schnell"]
    schnell_transformer.save_pretrained(root / schnell.folder / "transformer")
    FlowMatchEulerDiscreteScheduler(**schnell.scheduler).save_pretrained(root / schnell.folder / "scheduler")
    _write_safety_models(root)
    return root
