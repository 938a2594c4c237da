"""The published input schema as one table: names, order, kinds, defaults, bounds, choices, descriptions.

Everything that states an input reads it from here: `predict.py` declares its Cog inputs from it, the
request checks take their bounds and choices from it, and the command line builds its options and
`--help` from it. Torch-free on purpose, so the CLI can refuse a bad value before loading anything.
A test holds the table equal to the published seed, field for field.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal

from flux_day.models import MODELS
from flux_day.outputs import OUTPUT_FORMATS
from flux_day.sizes import ASPECT_RATIOS, CUSTOM, MEGAPIXEL_SIDE_SCALE

Kind = Literal["text", "file", "integer", "number", "boolean"]

_LORA = (
    "Load LoRA weights. Supports Replicate models in the format <owner>/<username> or "
    "<owner>/<username>/<version>, HuggingFace URLs in the format huggingface.co/<owner>/<model-name>,"
    " CivitAI URLs in the format civitai.com/models/<id>[/<model-name>], or arbitrary .safetensors "
    "URLs from the Internet. For example, 'fofr/flux-pixar-cars'"
)
_LORA_SCALE = (
    "Determines how strongly the {which} LoRA should be applied. Sane results between 0 and 1 for "
    "base inference. For go_fast we apply a 1.5x multiplier to this value; we've generally seen good "
    "performance when scaling the base value by that amount. You may still need to experiment to "
    "find the best value for your particular lora."
)
_IGNORED_WITH_IMAGE = "If provided, aspect_ratio, width, and height inputs are ignored."
_CUSTOM_SIDE = (
    "{side} of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to "
    "nearest multiple of 16. Incompatible with fast generation"
)


@dataclass(frozen=True)
class SchemaInput:
    """One published input. `default` None with `required` False means "may be left empty"."""

    name: str
    kind: Kind
    description: str
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()
    bounds: tuple[float, float] | None = None  # inclusive (minimum, maximum)


INPUTS: Final[tuple[SchemaInput, ...]] = (
    SchemaInput(
        "prompt",
        "text",
        "Prompt for generated image. If you include the `trigger_word` used in the training process "
        "you are more likely to activate the trained object, style, or concept in the resulting image.",
        required=True,
    ),
    SchemaInput("image", "file", f"Input image for image to image or inpainting mode. {_IGNORED_WITH_IMAGE}"),
    SchemaInput("mask", "file", f"Image mask for image inpainting mode. {_IGNORED_WITH_IMAGE}"),
    SchemaInput(
        "aspect_ratio",
        "text",
        "Aspect ratio for the generated image. If custom is selected, uses height and width below & "
        "will run in bf16 mode",
        default="1:1",
        choices=(*ASPECT_RATIOS, CUSTOM),
    ),
    SchemaInput("height", "integer", _CUSTOM_SIDE.format(side="Height"), bounds=(256, 1440)),
    SchemaInput("width", "integer", _CUSTOM_SIDE.format(side="Width"), bounds=(256, 1440)),
    SchemaInput(
        "prompt_strength",
        "number",
        "Prompt strength when using img2img. 1.0 corresponds to full destruction of information in image",
        default=0.8,
        bounds=(0, 1),
    ),
    SchemaInput(
        "model",
        "text",
        "Which model to run inference with. The dev model performs best with around 28 inference "
        "steps but the schnell model only needs 4 steps.",
        default="dev",
        choices=tuple(MODELS),
    ),
    SchemaInput("num_outputs", "integer", "Number of outputs to generate", default=1, bounds=(1, 4)),
    SchemaInput(
        "num_inference_steps",
        "integer",
        "Number of denoising steps. More steps can give more detailed images, but take longer.",
        default=28,
        bounds=(1, 50),
    ),
    SchemaInput(
        "guidance_scale",
        "number",
        "Guidance scale for the diffusion process. Lower values can give more realistic images. Good "
        "values to try are 2, 2.5, 3 and 3.5",
        default=3,
        bounds=(0, 10),
    ),
    SchemaInput("seed", "integer", "Random seed. Set for reproducible generation"),
    SchemaInput(
        "output_format",
        "text",
        "Format of the output images",
        default="webp",
        choices=tuple(OUTPUT_FORMATS),
    ),
    SchemaInput(
        "output_quality",
        "integer",
        "Quality when saving the output images, from 0 to 100. 100 is best quality, 0 is lowest "
        "quality. Not relevant for .png outputs",
        default=80,
        bounds=(0, 100),
    ),
    SchemaInput(
        "disable_safety_checker", "boolean", "Disable safety checker for generated images.", default=False
    ),
    SchemaInput(
        "go_fast",
        "boolean",
        "Run faster predictions with model optimized for speed (currently fp8 quantized); disable to "
        "run in original bf16",
        default=False,
    ),
    SchemaInput(
        "megapixels",
        "text",
        "Approximate number of megapixels for generated image",
        default="1",
        choices=tuple(MEGAPIXEL_SIDE_SCALE),
    ),
    SchemaInput("replicate_weights", "text", _LORA),
    SchemaInput("lora_scale", "number", _LORA_SCALE.format(which="main"), default=1, bounds=(-1, 3)),
    SchemaInput("extra_lora", "text", _LORA),
    SchemaInput("extra_lora_scale", "number", _LORA_SCALE.format(which="extra"), default=1, bounds=(-1, 3)),
)
SCHEMA: Final = MappingProxyType({field.name: field for field in INPUTS})

# The published default of each input (None: may be left empty, or required).
DEFAULTS: Final = MappingProxyType({field.name: field.default for field in INPUTS})
