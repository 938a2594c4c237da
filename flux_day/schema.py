"""The published input schema as one table, and the check of a value against its row; the request and
the CLI read it. Torch-free, so the CLI refuses a bad value before loading anything. `predict.py` restates
it as literals (`cog build` reads that file without running it); tests hold both equal to the seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal

from flux_day.errors import InputError
from flux_day.models import MODELS
from flux_day.outputs import OUTPUT_FORMATS
from flux_day.sizes import ASPECT_RATIOS, CUSTOM, MEGAPIXEL_SIDE_SCALE

Kind = Literal["text", "file", "integer", "number", "boolean"]
MAX_SEED: Final = 2**63 - 1  # seed + i must stay a valid torch seed

_LORA = (
    "Load LoRA weights. Supports Replicate models in the format <owner>/<username> or "
    "<owner>/<username>/<version>, HuggingFace URLs in the format huggingface.co/<owner>/<model-name>, "
    "CivitAI URLs in the format civitai.com/models/<id>[/<model-name>], or arbitrary .safetensors URLs from "
    "the Internet. For example, 'fofr/flux-pixar-cars'"
)
_LORA_SCALE = (
    "Determines how strongly the {} LoRA should be applied. Sane results between 0 and 1 for base inference. "
    "For go_fast we apply a 1.5x multiplier to this value; we've generally seen good performance when "
    "scaling the base value by that amount. You may still need to experiment to find the best value for your "
    "particular lora."
)
_IMAGE_SIZE = "If provided, aspect_ratio, width, and height inputs are ignored."
_SIDE = (
    "{} of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to nearest "
    "multiple of 16. Incompatible with fast generation"
)
_DESCRIPTIONS: Final = {
    "prompt": "Prompt for generated image. If you include the `trigger_word` used in the training process "
    "you are more likely to activate the trained object, style, or concept in the resulting image.",
    "image": f"Input image for image to image or inpainting mode. {_IMAGE_SIZE}",
    "mask": f"Image mask for image inpainting mode. {_IMAGE_SIZE}",
    "aspect_ratio": "Aspect ratio for the generated image. If custom is selected, uses height and width "
    "below & will run in bf16 mode",
    "height": _SIDE.format("Height"),
    "width": _SIDE.format("Width"),
    "prompt_strength": "Prompt strength when using img2img. 1.0 corresponds to full destruction of "
    "information in image",
    "model": "Which model to run inference with. The dev model performs best with around 28 inference steps "
    "but the schnell model only needs 4 steps.",
    "num_outputs": "Number of outputs to generate",
    "num_inference_steps": "Number of denoising steps. More steps can give more detailed images, but take "
    "longer.",
    "guidance_scale": "Guidance scale for the diffusion process. Lower values can give more realistic "
    "images. Good values to try are 2, 2.5, 3 and 3.5",
    "seed": "Random seed. Set for reproducible generation",
    "output_format": "Format of the output images",
    "output_quality": "Quality when saving the output images, from 0 to 100. 100 is best quality, 0 is "
    "lowest quality. Not relevant for .png outputs",
    "disable_safety_checker": "Disable safety checker for generated images.",
    "go_fast": "Run faster predictions with model optimized for speed (currently fp8 quantized); disable to "
    "run in original bf16",
    "megapixels": "Approximate number of megapixels for generated image",
    "replicate_weights": _LORA,
    "lora_scale": _LORA_SCALE.format("main"),
    "extra_lora": _LORA,
    "extra_lora_scale": _LORA_SCALE.format("extra"),
}


@dataclass(frozen=True)
class SchemaInput:
    """One published input; `default` None and not `required`: it may be left empty."""

    name: str
    kind: Kind
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()
    bounds: tuple[float, float] | None = None  # inclusive (minimum, maximum)

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self.name]

    def check(self, value: Any) -> Any:
        """`value` as it is used, or an `InputError`; files pass as they are, for the request to read."""
        name = self.name
        if value is None and self.default is None:
            if self.required:  # the prompt
                raise InputError(f"{name}: missing; give a text prompt describing the image.")
            return None  # left empty, as the schema allows
        if self.kind == "file":
            return value
        if self.kind == "boolean":
            if not isinstance(value, bool):
                raise InputError(f"{name}: {shown(value)} is not a boolean; give true or false.")
            return value
        if self.choices:
            if value not in self.choices:
                allowed = ", ".join(self.choices)
                raise InputError(f"{name}: {shown(value)} is not one of the choices; use one of {allowed}.")
            return value
        if self.kind == "text":
            if not isinstance(value, str):
                fix = "give a text prompt" if self.required else "give a string or leave it empty"
                raise InputError(f"{name}: {shown(value)} is not text; {fix}.")
            return value if self.required else value.strip() or None
        return self._number(value)

    def _number(self, value: Any) -> int | float:
        """A number within the bounds; JSON clients may send 2.0 for the integer 2."""
        whole = self.kind == "integer"
        kind = "an integer" if whole else "a number"
        wrong = isinstance(value, bool) or not isinstance(value, int | float)
        if isinstance(value, float):
            wrong = not (value.is_integer() if whole else math.isfinite(value))
        if wrong:
            raise InputError(
                f"{self.name}: {shown(value)} is not {kind}; give {'a whole number' if whole else kind}."
            )
        low, high = self.bounds or (0, MAX_SEED)  # the seed, unbounded in the schema: any valid torch seed
        if not low <= value <= high:
            empty = ", or leave it empty for a random seed" if self.name == "seed" else ""
            raise InputError(
                f"{self.name}: {shown(value)} is out of range; use {kind} from {low} to {high}{empty}."
            )
        return int(value) if whole else float(value)


INPUTS: Final[tuple[SchemaInput, ...]] = (
    SchemaInput("prompt", "text", required=True),
    SchemaInput("image", "file"),
    SchemaInput("mask", "file"),
    SchemaInput("aspect_ratio", "text", "1:1", choices=(*ASPECT_RATIOS, CUSTOM)),
    SchemaInput("height", "integer", bounds=(256, 1440)),
    SchemaInput("width", "integer", bounds=(256, 1440)),
    SchemaInput("prompt_strength", "number", 0.8, bounds=(0, 1)),
    SchemaInput("model", "text", "dev", choices=tuple(MODELS)),
    SchemaInput("num_outputs", "integer", 1, bounds=(1, 4)),
    SchemaInput("num_inference_steps", "integer", 28, bounds=(1, 50)),
    SchemaInput("guidance_scale", "number", 3, bounds=(0, 10)),
    SchemaInput("seed", "integer"),
    SchemaInput("output_format", "text", "webp", choices=tuple(OUTPUT_FORMATS)),
    SchemaInput("output_quality", "integer", 80, bounds=(0, 100)),
    SchemaInput("disable_safety_checker", "boolean", False),
    SchemaInput("go_fast", "boolean", False),
    SchemaInput("megapixels", "text", "1", choices=tuple(MEGAPIXEL_SIDE_SCALE)),
    SchemaInput("replicate_weights", "text"),
    SchemaInput("lora_scale", "number", 1, bounds=(-1, 3)),
    SchemaInput("extra_lora", "text"),
    SchemaInput("extra_lora_scale", "number", 1, bounds=(-1, 3)),
)
SCHEMA: Final = MappingProxyType({field.name: field for field in INPUTS})
DEFAULTS: Final = MappingProxyType({field.name: field.default for field in INPUTS})
LORA_INPUTS: Final = {"replicate_weights": "lora_scale", "extra_lora": "extra_lora_scale"}  # LoRA -> scale


def refuse_unknown(given: Iterable[str], accepted: Sequence[str] = tuple(SCHEMA)) -> None:
    """Refuse, by name, the first of `given` that is not an accepted input (the published ones)."""
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise InputError(
            f"{unknown[0]}: not an input of this model; leave it out. The inputs are: {', '.join(accepted)}."
        )


def shown(value: Any) -> str:
    """A value as it may appear in an error: short, and never a local path or object repr."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
