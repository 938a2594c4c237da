"""The FLUX.1 variants and the names of what the engine loads, as torch-free data every part reads.

The text encoders, tokenizers and VAE ship with dev and are shared. A transformer is named for its
model and precision (`dev-full` as loaded, `dev-fp8` its go_fast copy) in plans, settings and logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

# The components of a diffusers FLUX pipeline folder that both models share.
SHARED_COMPONENTS: Final = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
# FLUX.1's timestep shift range (dev interpolates between these with the image size).
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
    # "main": no commit is known here (the one it resolved to is recorded in `.flux-day-source.json`).
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
    return next(spec for spec in MODELS.values() if spec.ships_shared)


# Components every request uses; "safety" is the CompVis checker and the Falconsai classifier together.
CLIP: Final = "clip"
T5: Final = "t5"
VAE: Final = "vae"
SAFETY: Final = "safety"


def transformer_component(model: str, fp8: bool) -> str:
    """The name of `model`'s transformer in full precision (`dev-full`) or fp8 (`dev-fp8`)."""
    return f"{model}-{'fp8' if fp8 else 'full'}"


TRANSFORMERS: Final = tuple(transformer_component(model, fp8) for model in MODELS for fp8 in (False, True))
