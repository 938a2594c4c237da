"""The weights layout (weights/README.md): folder names under the weights root, kept in one place."""

from __future__ import annotations

from pathlib import Path

from flux_day.models import MODELS, shared_spec

DEV_FOLDER = MODELS["dev"].folder
SCHNELL_FOLDER = MODELS["schnell"].folder
SAFETY_CHECKER_FOLDER = "safety-checker"
NSFW_CLASSIFIER_FOLDER = "nsfw-classifier"


def has_base_models(root: Path) -> bool:
    """True when every model's transformer and the shared components are present under `root`."""
    return (root / shared_spec().folder / "model_index.json").is_file() and all(
        (root / spec.folder / "transformer" / "config.json").is_file() for spec in MODELS.values()
    )
