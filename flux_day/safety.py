"""The safety filter: an image CompVis' checker flags is dropped unless Falconsai's classifier calls it
`normal` (the reference predictor's rule, cutting CompVis' false positives). It fails closed: models
that do not load fail setup, and an error while checking fails the prediction rather than pass an image.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from torch import nn
from transformers import AutoImageProcessor, AutoModelForImageClassification, CLIPImageProcessor

from flux_day.errors import ContentError, WeightsError
from flux_day.weights.manifest import NSFW_CLASSIFIER_FOLDER, SAFETY_CHECKER_FOLDER

log = logging.getLogger(__name__)

ALL_FLAGGED = "All generated images contained NSFW content. Try running it again with a different prompt."
SAFE_LABEL = "normal"


class SafetyFilter(nn.Module):
    """Both safety models as one module, so the memory plan can place them together."""

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        try:
            self.checker = StableDiffusionSafetyChecker.from_pretrained(
                root / SAFETY_CHECKER_FOLDER, dtype=dtype
            )
            self.checker_processor = CLIPImageProcessor.from_pretrained(root / SAFETY_CHECKER_FOLDER)
            self.classifier = AutoModelForImageClassification.from_pretrained(
                root / NSFW_CLASSIFIER_FOLDER, dtype=dtype
            )
            self.classifier_processor = AutoImageProcessor.from_pretrained(root / NSFW_CLASSIFIER_FOLDER)
        except (OSError, ValueError) as error:
            raise WeightsError(
                f"The safety models under {root} ({SAFETY_CHECKER_FOLDER}/, {NSFW_CLASSIFIER_FOLDER}/) "
                f"cannot be loaded ({type(error).__name__}); run `python scripts/download_weights.py` to "
                "fetch them. The server does not start without them."
            ) from None
        self.to(device).eval()

    @classmethod
    def from_modules(
        cls,
        checker: StableDiffusionSafetyChecker,
        checker_processor: CLIPImageProcessor,
        classifier: nn.Module,
        classifier_processor: object,
    ) -> SafetyFilter:
        """The filter around models built in memory (the GPU proof), not read from a weights root."""
        safety = cls.__new__(cls)
        nn.Module.__init__(safety)
        safety.checker, safety.checker_processor = checker.eval(), checker_processor
        safety.classifier, safety.classifier_processor = classifier.eval(), classifier_processor
        return safety

    @torch.inference_mode()
    def filter(self, images: list[Image.Image]) -> list[Image.Image]:
        """The images both models let through, in order; `ContentError` when none is left."""
        started = time.perf_counter()
        weight = next(self.checker.parameters())
        device, dtype = weight.device, weight.dtype
        clip_input = self.checker_processor(images, return_tensors="pt").pixel_values.to(device, dtype)
        placeholders = [np.zeros((1, 1, 3)) for _ in images]  # the checker blacks these out; we drop instead
        _, flagged = self.checker(clip_input=clip_input, images=placeholders)
        suspects = [i for i, is_flagged in enumerate(flagged) if is_flagged]
        dropped: set[int] = set()
        if suspects:
            pixels = self.classifier_processor(
                [images[i] for i in suspects], return_tensors="pt"
            ).pixel_values
            logits = self.classifier(pixel_values=pixels.to(device, dtype)).logits
            labels = [self.classifier.config.id2label[int(k)] for k in logits.argmax(-1)]
            dropped = {i for i, label in zip(suspects, labels, strict=True) if label != SAFE_LABEL}
        counts = (len(suspects), len(images), len(dropped), time.perf_counter() - started)
        log.info("safety: %d of %d images flagged, %d confirmed and dropped, in %.2fs", *counts)
        if len(dropped) == len(images):
            raise ContentError(ALL_FLAGGED)
        return [image for i, image in enumerate(images) if i not in dropped]
