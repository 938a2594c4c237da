"""The safety filter: CompVis flags, Falconsai confirms, confirmed images are dropped, and it fails closed.

The tiny stand-in models pass ordinary images; these tests make them flag by changing a threshold
or a bias, in memory for the engine and in a copied weights tree for the Cog server.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from flux_day.config import Settings
from flux_day.engine import Engine
from flux_day.errors import ContentError, WeightsError
from flux_day.request import GenerationRequest
from flux_day.safety import ALL_FLAGGED, SafetyFilter
from flux_day.weights.manifest import NSFW_CLASSIFIER_FOLDER, SAFETY_CHECKER_FOLDER
from scripts.random_weights.tree import write_tiny_weights
from tests.harness.cog_server import CogServer, server_env

SMALL = {"prompt": "a fox", "num_inference_steps": 2, "aspect_ratio": "1:1", "megapixels": "0.25", "seed": 11}


def generate(engine: Engine, **inputs: object) -> list[np.ndarray]:
    request = GenerationRequest.from_inputs(**{**SMALL, **inputs})
    return [np.asarray(image) for image in engine.generate(request).images]


@contextmanager
def judged(
    safety: SafetyFilter, threshold: float | None = None, bias: list[float] | None = None
) -> Iterator[None]:
    """Temporarily set the checker's concept thresholds and the classifier's (normal, nsfw) bias."""
    thresholds = safety.checker.concept_embeds_weights.detach().clone()
    original_bias = safety.classifier.classifier.bias.detach().clone()
    with torch.no_grad():
        if threshold is not None:
            safety.checker.concept_embeds_weights.fill_(threshold)
        if bias is not None:
            safety.classifier.classifier.bias.copy_(torch.tensor(bias))
    try:
        yield
    finally:
        with torch.no_grad():
            safety.checker.concept_embeds_weights.copy_(thresholds)
            safety.classifier.classifier.bias.copy_(original_bias)


def nsfw_margins(safety: SafetyFilter, images: list[np.ndarray]) -> np.ndarray:
    """The classifier's nsfw-minus-normal logit per image, before its bias."""
    from PIL import Image

    pixels = safety.classifier_processor(
        [Image.fromarray(i) for i in images], return_tensors="pt"
    ).pixel_values
    with torch.no_grad():
        logits = safety.classifier(pixel_values=pixels).logits - safety.classifier.classifier.bias
    return (logits[:, 1] - logits[:, 0]).numpy()


def test_ordinary_images_pass(engine: Engine) -> None:
    assert len(generate(engine, num_outputs=3)) == 3


def test_an_image_the_checker_flags_is_kept_when_the_classifier_calls_it_normal(engine: Engine) -> None:
    expected = generate(engine, num_outputs=2)
    with judged(engine.safety, threshold=-1.0, bias=[10.0, -10.0]):
        kept = generate(engine, num_outputs=2)
    assert len(kept) == 2 and all(np.array_equal(a, b) for a, b in zip(kept, expected, strict=True))


def test_confirmed_images_are_dropped_and_all_dropped_fails(engine: Engine) -> None:
    images = generate(engine, num_outputs=3, disable_safety_checker=True)
    margins = nsfw_margins(engine.safety, images)
    order = np.argsort(margins)
    # A bias between the lowest margin and the next drops every image but the lowest.
    split = -(margins[order[0]] + margins[order[1]]) / 2
    with judged(engine.safety, threshold=-1.0, bias=[0.0, float(split)]):
        (kept,) = generate(engine, num_outputs=3)
    assert np.array_equal(kept, images[order[0]])
    with judged(engine.safety, threshold=-1.0, bias=[-10.0, 10.0]), pytest.raises(ContentError) as error:
        generate(engine, num_outputs=3)
    assert str(error.value) == ALL_FLAGGED
    with judged(engine.safety, threshold=-1.0, bias=[-10.0, 10.0]):
        assert len(generate(engine, num_outputs=3, disable_safety_checker=True)) == 3


def test_an_error_inside_the_checker_fails_the_prediction(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("checker crashed")

    monkeypatch.setattr(engine.safety.checker, "forward", broken)
    with pytest.raises(RuntimeError, match="checker crashed"):
        generate(engine)


@pytest.mark.parametrize("missing", [SAFETY_CHECKER_FOLDER, NSFW_CLASSIFIER_FOLDER])
def test_missing_safety_models_fail_setup(tiny_weights: Path, tmp_path: Path, missing: str) -> None:
    root = tmp_path / "weights"
    shutil.copytree(tiny_weights, root, ignore=shutil.ignore_patterns("lora-cache", missing))
    settings = Settings.from_env(
        {"FLUX_DAY_WEIGHTS": str(root), "FLUX_DAY_DEVICE": "cpu", "FLUX_DAY_OFFLINE": "1"}
    )
    with pytest.raises(WeightsError, match=rf"missing under .*\({missing}/\).*download_weights"):
        Engine(settings)
    (root / missing).mkdir()  # present but unreadable: still no server without its safety models
    with pytest.raises(WeightsError, match=r"missing under|safety models .* cannot be loaded"):
        Engine(settings)


def write_judging_tree(root: Path, bias: list[float]) -> Path:
    """Tiny weights whose checker flags everything and whose classifier has `bias`."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import ViTForImageClassification

    write_tiny_weights(root)
    checker = StableDiffusionSafetyChecker.from_pretrained(root / SAFETY_CHECKER_FOLDER)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-1.0)
    checker.save_pretrained(root / SAFETY_CHECKER_FOLDER)
    classifier = ViTForImageClassification.from_pretrained(root / NSFW_CLASSIFIER_FOLDER)
    with torch.no_grad():
        classifier.classifier.bias.copy_(torch.tensor(bias))
    classifier.save_pretrained(root / NSFW_CLASSIFIER_FOLDER)
    return root


def test_the_cog_server_drops_confirmed_images_and_fails_when_none_is_left(
    engine: Engine, tmp_path: Path
) -> None:
    images = generate(engine, num_outputs=3, disable_safety_checker=True)
    margins = np.sort(nsfw_margins(engine.safety, images))
    split = -(margins[0] + margins[1]) / 2
    inputs = {**SMALL, "num_outputs": 3, "output_format": "png"}
    for bias, kept in (([0.0, float(split)], 1), ([-10.0, 10.0], 0)):
        root = write_judging_tree(tmp_path / f"weights-{kept}", bias)
        with CogServer.ready(server_env(root, tmp_path), tmp_path / f"cog-{kept}.log") as server:
            if kept:
                assert len(server.images(**inputs)) == kept
                assert len(server.images(**inputs, disable_safety_checker=True)) == 3
            else:
                response = server.predict(**inputs)
                assert response["status"] == "failed"
                assert response["error"].endswith(ALL_FLAGGED)
                assert server.becomes_ready()
    assert "safety: 3 of 3 images flagged, 2 confirmed and dropped" in (tmp_path / "cog-1.log").read_text()
