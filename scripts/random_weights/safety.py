"""Random stand-ins for the CompVis safety checker and the Falconsai classifier, at tiny or real size."""

from __future__ import annotations

import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)


def _vision(hidden: int, ff: int, heads: int, layers: int, image: int, patch: int) -> dict[str, int]:
    return dict(
        hidden_size=hidden,
        intermediate_size=ff,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        image_size=image,
        patch_size=patch,
    )


# CLIP ViT-L/14 and ViT-base/16 at 224 pixels, as the real models; and a tiny vision tower for tests.
FULL_CHECKER = _vision(1024, 4096, 16, 24, 224, 14)
FULL_CLASSIFIER = _vision(768, 3072, 12, 12, 224, 16)
TINY_VISION = _vision(32, 37, 4, 2, 32, 8)
# The checker's CLIP text tower is never run; it only has to exist.
_TEXT = dict(
    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=100
) | {"bos_token_id": 0, "eos_token_id": 2}


def safety_models(
    full: bool,
) -> tuple[StableDiffusionSafetyChecker, CLIPImageProcessor, ViTForImageClassification, ViTImageProcessor]:
    """The checker and the classifier, with processors, passing ordinary images.

    The checker flags when cosine similarity exceeds a concept's threshold; thresholds of 1.0 are
    never exceeded. The classifier's bias favours `normal`. Tests lower these to make them flag.
    """
    vision, classifier_vision = (FULL_CHECKER, FULL_CLASSIFIER) if full else (TINY_VISION, TINY_VISION)
    projection, pixels = (768, 224) if full else (32, 32)
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(text_config=_TEXT, vision_config=vision, projection_dim=projection)
    )
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(1.0)
        checker.special_care_embeds_weights.fill_(1.0)
    checker_processor = CLIPImageProcessor(
        size={"shortest_edge": pixels}, crop_size={"height": pixels, "width": pixels}
    )
    labels = {0: "normal", 1: "nsfw"}
    classifier = ViTForImageClassification(
        ViTConfig(**classifier_vision, num_labels=2, id2label=labels, label2id={"normal": 0, "nsfw": 1})
    )
    with torch.no_grad():
        classifier.classifier.bias.copy_(torch.tensor([10.0, -10.0]))
    return checker, checker_processor, classifier, ViTImageProcessor(size={"height": pixels, "width": pixels})
