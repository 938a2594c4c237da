"""The weights layout (its folder names) and where each folder comes from: one table of Hugging Face repos,
as data (the host is `HF_ENDPOINT`). Pickled formats are never fetched, whatever a pattern says."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Final

from flux_day.models import MODELS, SHARED_COMPONENTS, ModelSpec, shared_spec

DEV_FOLDER, SCHNELL_FOLDER = MODELS["dev"].folder, MODELS["schnell"].folder
SAFETY_CHECKER_FOLDER, NSFW_CLASSIFIER_FOLDER = "safety-checker", "nsfw-classifier"
# Each folder's size on the Hub (dev: transformer 23.8 + T5 9.5 + CLIP and VAE 0.4), for the notice.
DOWNLOAD_GB = {DEV_FOLDER: 34, SCHNELL_FOLDER: 24, SAFETY_CHECKER_FOLDER: 1.2, NSFW_CLASSIFIER_FOLDER: 0.35}
NEVER_FETCHED: Final = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")  # loading them runs code


def has_base_models(root: Path) -> bool:
    """True when every model's transformer and the shared components are present under `root`."""
    return (root / shared_spec().folder / "model_index.json").is_file() and all(
        (root / spec.folder / "transformer" / "config.json").is_file() for spec in MODELS.values()
    )


@dataclass(frozen=True)
class Source:
    """The files of one layout folder: from one Hub repo at one revision, those `allow` matches (shell-style
    patterns in which `*` also crosses `/`)."""

    folder: str  # relative to the weights root
    repo_id: str
    revision: str  # a commit hash pins the bytes; a branch is resolved to its commit at download time
    allow: tuple[str, ...]
    required: tuple[str, ...]  # each must match a listed file; on disk, their absence means incomplete

    def wants(self, path: str) -> bool:
        """True when `path` (a repo path) is one of the files this row fetches."""
        return any(fnmatchcase(path, p) for p in self.allow) and not any(
            fnmatchcase(path.rsplit("/", 1)[-1], p) for p in NEVER_FETCHED
        )


def model_source(spec: ModelSpec) -> Source:
    """One FLUX.1 variant's row: the diffusers layout only (not the root's single files, the same weights
    again). dev's row brings what both models share; schnell's only what differs."""
    weighted = ("transformer", *(c for c in SHARED_COMPONENTS if spec.ships_shared and "tokenizer" not in c))
    tokenizers = tuple(c for c in SHARED_COMPONENTS if spec.ships_shared and "tokenizer" in c)
    index = ("model_index.json",) if spec.ships_shared else ()
    return Source(
        folder=spec.folder,
        repo_id=spec.repo_id,
        revision=spec.revision,
        allow=(*index, "scheduler/*", *(f"{sub}/*" for sub in (*weighted, *tokenizers))),
        required=(
            *index,
            "scheduler/scheduler_config.json",
            *(f"{sub}/{name}" for sub in weighted for name in ("config.json", "*.safetensors")),
            *(f"{sub}/tokenizer_config.json" for sub in tokenizers),
        ),
    )


_MODEL = ("config.json", "model.safetensors", "preprocessor_config.json")  # a model and its processor
_FALCON = "04367978d3474804ab1a00a9bd6548b741764069"
MANIFEST: Final[tuple[Source, ...]] = (
    *(model_source(spec) for spec in MODELS.values()),
    # CompVis' main branch ships a pickle; refs/pr/41 adds model.safetensors (its commit is recorded).
    Source(SAFETY_CHECKER_FOLDER, "CompVis/stable-diffusion-safety-checker", "refs/pr/41", _MODEL, _MODEL),
    # Falconsai's ViT classifier, at the commit other projects pin (the repo also holds pickles).
    Source(NSFW_CLASSIFIER_FOLDER, "Falconsai/nsfw_image_detection", _FALCON, _MODEL, _MODEL),
)
