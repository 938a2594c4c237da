"""The Cog surface of flux-day: the published inputs, delegated to `GenerationRequest` (checks),
`GpuScheduler` (the one `Engine`; blocking work in threads, so requests overlap) and `OutputStore`.

`cog build` reads these declarations without running this file, so every `Input(...)` argument is a
literal. They are the one table of the published inputs: `flux_day.schema` reads them from here.
"""

from __future__ import annotations

import logging

from cog import BaseRunner, Input, Path

from flux_day.config import Settings
from flux_day.engine import Engine
from flux_day.outputs import OutputStore
from flux_day.request import GenerationRequest
from flux_day.scheduler import GpuScheduler
from flux_day.server_log import keep_internals_out_of_predictions
from flux_day.serving import client_file, declared_inputs_only, running_predictions_file, user_facing_errors


class Predictor(BaseRunner):
    """FLUX.1 [dev] and [schnell]: text-to-image, image-to-image and inpainting."""

    def setup(self, weights: str | None = None) -> None:
        """Load both models once; `weights` (or COG_WEIGHTS) names a default LoRA."""
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        keep_internals_out_of_predictions()
        self.engine = Engine(Settings.from_env(), default_lora=str(weights) if weights else None)
        self.scheduler = GpuScheduler(self.engine, running_predictions_file())
        self.outputs = OutputStore()
        # Without a schema file coglet hands run() every key of the request: refuse unknown ones by name.
        self.run = declared_inputs_only(self.run)  # type: ignore[method-assign]

    # One line per input, so the published schema reads as a table.
    # fmt: off
    async def run(
        self,
        prompt: str = Input(description="Prompt for generated image. If you include the `trigger_word` used in the training process you are more likely to activate the trained object, style, or concept in the resulting image."),
        image: Path | None = Input(default=None, description="Input image for image to image or inpainting mode. If provided, aspect_ratio, width, and height inputs are ignored."),
        mask: Path | None = Input(default=None, description="Image mask for image inpainting mode. If provided, aspect_ratio, width, and height inputs are ignored."),
        aspect_ratio: str = Input(default="1:1", choices=["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21", "custom"], description="Aspect ratio for the generated image. If custom is selected, uses height and width below & will run in bf16 mode"),
        height: int | None = Input(default=None, ge=256, le=1440, description="Height of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to nearest multiple of 16. Incompatible with fast generation"),
        width: int | None = Input(default=None, ge=256, le=1440, description="Width of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to nearest multiple of 16. Incompatible with fast generation"),
        prompt_strength: float = Input(default=0.8, ge=0, le=1, description="Prompt strength when using img2img. 1.0 corresponds to full destruction of information in image"),
        model: str = Input(default="dev", choices=["dev", "schnell"], description="Which model to run inference with. The dev model performs best with around 28 inference steps but the schnell model only needs 4 steps."),
        num_outputs: int = Input(default=1, ge=1, le=4, description="Number of outputs to generate"),
        num_inference_steps: int = Input(default=28, ge=1, le=50, description="Number of denoising steps. More steps can give more detailed images, but take longer."),
        guidance_scale: float = Input(default=3, ge=0, le=10, description="Guidance scale for the diffusion process. Lower values can give more realistic images. Good values to try are 2, 2.5, 3 and 3.5"),
        seed: int | None = Input(default=None, description="Random seed. Set for reproducible generation"),
        output_format: str = Input(default="webp", choices=["webp", "jpg", "png"], description="Format of the output images"),
        output_quality: int = Input(default=80, ge=0, le=100, description="Quality when saving the output images, from 0 to 100. 100 is best quality, 0 is lowest quality. Not relevant for .png outputs"),
        disable_safety_checker: bool = Input(default=False, description="Disable safety checker for generated images."),
        go_fast: bool = Input(default=False, description="Run faster predictions with model optimized for speed (currently fp8 quantized); disable to run in original bf16"),
        megapixels: str = Input(default="1", choices=["1", "0.25"], description="Approximate number of megapixels for generated image"),
        replicate_weights: str | None = Input(default=None, description="Load LoRA weights. Supports Replicate models in the format <owner>/<username> or <owner>/<username>/<version>, HuggingFace URLs in the format huggingface.co/<owner>/<model-name>, CivitAI URLs in the format civitai.com/models/<id>[/<model-name>], or arbitrary .safetensors URLs from the Internet. For example, 'fofr/flux-pixar-cars'"),
        lora_scale: float = Input(default=1, ge=-1, le=3, description="Determines how strongly the main LoRA should be applied. Sane results between 0 and 1 for base inference. For go_fast we apply a 1.5x multiplier to this value; we've generally seen good performance when scaling the base value by that amount. You may still need to experiment to find the best value for your particular lora."),
        extra_lora: str | None = Input(default=None, description="Load LoRA weights. Supports Replicate models in the format <owner>/<username> or <owner>/<username>/<version>, HuggingFace URLs in the format huggingface.co/<owner>/<model-name>, CivitAI URLs in the format civitai.com/models/<id>[/<model-name>], or arbitrary .safetensors URLs from the Internet. For example, 'fofr/flux-pixar-cars'"),
        extra_lora_scale: float = Input(default=1, ge=-1, le=3, description="Determines how strongly the extra LoRA should be applied. Sane results between 0 and 1 for base inference. For go_fast we apply a 1.5x multiplier to this value; we've generally seen good performance when scaling the base value by that amount. You may still need to experiment to find the best value for your particular lora."),
    ) -> list[Path]:
        """Generate images; see the input descriptions."""
        inputs = {name: value for name, value in locals().items() if name != "self"}
        with self.scheduler.admitted(), user_facing_errors():
            # A file input is read only if Cog made it from the client's upload.
            inputs |= {name: client_file(name, inputs[name]) for name in ("image", "mask")}
            request = await self.scheduler.in_thread(GenerationRequest.from_inputs, **inputs)
            request = request.with_default_lora(self.engine.default_lora)
            generation = await self.scheduler.generate(request)
            for key, value in generation.metrics.items():
                self.record_metric(key, value)
            saved = await self.scheduler.in_thread(
                self.outputs.save,
                generation.images,
                request.output_format,
                request.output_quality,
                others_running=self.scheduler.running > 1,
            )
            return [Path(p) for p in saved]
    # fmt: on
