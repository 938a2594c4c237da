"""The weights layout of DESIGN.md: folder names under the weights root, kept in one place."""

from __future__ import annotations

from pathlib import Path

DEV_FOLDER = "FLUX.1-dev"
SCHNELL_FOLDER = "FLUX.1-schnell"
SAFETY_CHECKER_FOLDER = "safety-checker"
NSFW_CLASSIFIER_FOLDER = "nsfw-classifier"


def has_base_models(root: Path) -> bool:
    """True when both transformers and dev's shared components are present under `root`."""
    return (root / DEV_FOLDER / "model_index.json").is_file() and (
        root / SCHNELL_FOLDER / "transformer" / "config.json"
    ).is_file()
