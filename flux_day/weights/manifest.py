"""Where each folder of the weights layout comes from: one table of Hugging Face repos, as data (the
host is `HF_ENDPOINT`). Pickled formats are never fetched, whatever a pattern says: loading runs code."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Final

from flux_day.models import MODELS, SHARED_COMPONENTS, ModelSpec
from flux_day.weights.layout import NSFW_CLASSIFIER_FOLDER, SAFETY_CHECKER_FOLDER

NEVER_FETCHED: Final = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")


@dataclass(frozen=True)
class Source:
    """Files of one Hub repo at one revision that go into one folder of the weights layout (a folder may
    take files from several rows). `allow`: shell-style patterns in which `*` also crosses `/`."""

    folder: str  # a folder of `layout.py`, relative to the weights root
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
    """The row of one FLUX.1 variant: the diffusers layout only (not the repo root's single files, the
    same weights again). dev's row brings what both models share; schnell's only what differs."""
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
    # CompVis' checker: its main branch ships a pickle; refs/pr/41 adds model.safetensors (the commit
    # it resolved to is recorded in the folder's `.flux-day-source.json`).
    Source(SAFETY_CHECKER_FOLDER, "CompVis/stable-diffusion-safety-checker", "refs/pr/41", _MODEL, _MODEL),
    # Falconsai's ViT classifier, at the commit other projects pin (the repo also holds pickles).
    Source(NSFW_CLASSIFIER_FOLDER, "Falconsai/nsfw_image_detection", _FALCON, _MODEL, _MODEL),
)


def folders(manifest: tuple[Source, ...] = MANIFEST) -> dict[str, tuple[Source, ...]]:
    """The manifest's rows grouped by folder, in table order."""
    names = dict.fromkeys(source.folder for source in manifest)
    return {folder: tuple(source for source in manifest if source.folder == folder) for folder in names}
