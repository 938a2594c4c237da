"""The FLUX.1 variants as data: one torch-free table every part of flux-day reads.

Loading, the weights manifest, the random tree builders, the request checks and the benchmarks all
read it (as BFL's `configs` table is read).

dev and schnell differ in their transformer (dev is guidance-distilled), their scheduler (dev shifts
its timesteps with the image size), the T5 sequence length they were trained with and the steps they
need. Everything else (text encoders, tokenizers, VAE) ships with dev and is shared.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

# The components of a diffusers FLUX pipeline folder that both models share.
SHARED_COMPONENTS: Final = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
# FLUX.1's timestep shift range (dev interpolates its shift between these with the image size).
_SHIFT_RANGE: Final = {
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


@dataclass(frozen=True)
class ModelSpec:
    """What distinguishes one FLUX.1 variant, and where its weights come from."""

    name: str  # the schema's `model` choice
    folder: str  # under the weights root, in the diffusers layout
    repo_id: str  # on the Hugging Face Hub
    # A commit pins the bytes; "main" because no commit of it is known to us here (the commit it
    # resolved to is recorded in the folder's `.flux-day-source.json`). Pin it once known.
    revision: str
    max_sequence_length: int  # T5 tokens the model was trained with
    guidance_embeds: bool  # dev is guidance-distilled; schnell takes no guidance
    default_steps: int
    scheduler: Mapping[str, object] = field(default_factory=dict)  # FlowMatchEulerDiscreteScheduler's
    ships_shared: bool = False  # its folder holds the text encoders, tokenizers and VAE both models use


MODELS: Final[Mapping[str, ModelSpec]] = MappingProxyType(
    {
        "dev": ModelSpec(
            name="dev",
            folder="FLUX.1-dev",
            repo_id="black-forest-labs/FLUX.1-dev",
            revision="main",
            max_sequence_length=512,
            guidance_embeds=True,
            default_steps=28,
            scheduler=MappingProxyType({"shift": 3.0, "use_dynamic_shifting": True, **_SHIFT_RANGE}),
            ships_shared=True,
        ),
        "schnell": ModelSpec(
            name="schnell",
            folder="FLUX.1-schnell",
            repo_id="black-forest-labs/FLUX.1-schnell",
            revision="main",
            max_sequence_length=256,
            guidance_embeds=False,
            default_steps=4,
            scheduler=MappingProxyType({"shift": 1.0, "use_dynamic_shifting": False, **_SHIFT_RANGE}),
        ),
    }
)


def shared_spec() -> ModelSpec:
    """The variant whose folder holds the shared components (dev)."""
    return next(spec for spec in MODELS.values() if spec.ships_shared)
