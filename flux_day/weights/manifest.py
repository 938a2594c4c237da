"""Where each folder of the weights layout comes from: one table of Hugging Face repos, as data.

Each row names the layout folder it fills, the repo and revision it is fetched from, the repo paths
to fetch (`allow`, shell-style patterns in which `*` also crosses `/`) and the patterns a folder must
have a file for to count as complete (`required`): they are checked against the Hub's listing before
anything is downloaded, and against the disk to decide whether a folder is already there. A folder
may take files from several rows (the same path must not come from two). The host is not here: it
is `HF_ENDPOINT` (`Settings.hf_endpoint`), so tests point the same table at a fake Hub.

Only safetensors weights are fetched: pickled formats (`.bin`, `.pt`, ...) are never downloaded,
whatever a pattern says, because loading them runs code.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Final

from flux_day.models import MODELS, SHARED_COMPONENTS, ModelSpec
from flux_day.weights.layout import NSFW_CLASSIFIER_FOLDER, SAFETY_CHECKER_FOLDER

# Pickle-based formats: never fetched, even if a pattern matches them.
NEVER_FETCHED: Final = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")


@dataclass(frozen=True)
class Source:
    """Files of one Hub repo at one revision that go into one folder of the weights layout."""

    folder: str  # a folder of `layout.py`, relative to the weights root
    repo_id: str
    revision: str  # a commit hash pins the bytes; a branch is resolved to its commit at download time
    allow: tuple[str, ...]  # repo paths to fetch
    required: tuple[str, ...]  # each must match a fetched file; on disk, their absence means incomplete

    def wants(self, path: str) -> bool:
        """True when `path` (a repo path) is one of the files this row fetches."""
        return any(fnmatchcase(path, p) for p in self.allow) and not any(
            fnmatchcase(path.rsplit("/", 1)[-1], p) for p in NEVER_FETCHED
        )


def model_source(spec: ModelSpec) -> Source:
    """The row of one FLUX.1 variant (`model_specs.MODELS`): the diffusers layout only, not the
    single-file flux1-dev.safetensors / ae.safetensors at the repo root (the same weights again, 34 GB
    more). dev's row brings the text encoders, tokenizers and VAE both models share; schnell's only
    what differs. FLUX.1 [dev] is gated: HF_TOKEN must belong to an account that accepted its license.
    """
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


MANIFEST: Final[tuple[Source, ...]] = (
    *(model_source(spec) for spec in MODELS.values()),
    # CompVis' checker and its CLIP image processor (preprocessor_config.json) from one repo. Its main
    # branch has shipped the weights as pytorch_model.bin (a pickle); refs/pr/41 is the pull request
    # that adds model.safetensors, the ref other projects fetch that file from. Not a commit: the
    # commit it resolved to is recorded in the folder's `.flux-day-source.json`.
    Source(
        folder=SAFETY_CHECKER_FOLDER,
        repo_id="CompVis/stable-diffusion-safety-checker",
        revision="refs/pr/41",
        allow=("config.json", "model.safetensors", "preprocessor_config.json"),
        required=("config.json", "model.safetensors", "preprocessor_config.json"),
    ),
    # Falconsai's ViT classifier and its processor, at the commit other projects pin for these files
    # (the repo also holds pickles, an ONNX export and an unrelated YOLO model: not fetched).
    Source(
        folder=NSFW_CLASSIFIER_FOLDER,
        repo_id="Falconsai/nsfw_image_detection",
        revision="04367978d3474804ab1a00a9bd6548b741764069",
        allow=("config.json", "model.safetensors", "preprocessor_config.json"),
        required=("config.json", "model.safetensors", "preprocessor_config.json"),
    ),
)


def folders(manifest: tuple[Source, ...] = MANIFEST) -> dict[str, tuple[Source, ...]]:
    """The manifest's rows grouped by folder, in table order."""
    grouped: dict[str, list[Source]] = {}
    for source in manifest:
        grouped.setdefault(source.folder, []).append(source)
    return {folder: tuple(rows) for folder, rows in grouped.items()}
