"""go_fast's other half, regional torch.compile: the transformers' repeated blocks, token count dynamic.

Every block of a class runs one graph at every size; setup runs one step at each seed token count, an
odd size and one token, so dynamo specialises at setup. LoRA fuses write tensors in place and dynamo
never guards on values: a switch never recompiles. Inductor's options go per compile, never globally.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

from flux_day.errors import SettingsError
from flux_day.sizes import ASPECT_RATIOS, MEGAPIXEL_SIDE_SCALE, SIZE_STEP, aspect_ratio_size

log = logging.getLogger(__name__)

# huggingface/flux-fast's choices for FLUX on an H100: tune each Triton kernel's launch (paid once, kept
# in the cache) trying every direction, and leave pointwise epilogues to their own fused kernels.
INDUCTOR_OPTIONS: Final[dict[str, Any]] = {
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
}
# Odd, no seed token count and no text length: settles the dynamic graphs, so no request compiles.
ODD_SIZE: Final = (336, 464)
ONE_TOKEN: Final = (16, 16)  # the smallest img2img size (`sizes.image_size`): one token


def compile_backend(setting: str, device: torch.device) -> str | None:
    """`Settings.compile` ("auto", "off" or a backend) as a torch.compile backend, or None for none."""
    if setting in {"auto", "off"}:
        return "inductor" if setting == "auto" and device.type == "cuda" else None
    known = {"inductor", *torch.compiler.list_backends(exclude_tags=())}
    if setting not in known:
        raise SettingsError(
            f"FLUX_DAY_COMPILE={setting!r} is not a torch.compile backend; set auto, 0, 1 or one of "
            f"{', '.join(sorted(known))}."
        )
    return setting


def seed_sizes() -> list[tuple[int, int]]:
    """The 22 (width, height) sizes the schema's aspect ratios and megapixel choices give."""
    return [aspect_ratio_size(ratio, mp) for mp in MEGAPIXEL_SIDE_SCALE for ratio in ASPECT_RATIOS]


def image_tokens(width: int, height: int) -> int:
    """Latent tokens FLUX's transformer sees for an image (2x2 patches of an 8x VAE)."""
    return (width // SIZE_STEP) * (height // SIZE_STEP)


def warm_up_sizes(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """One size per token count of `sizes`, then `ODD_SIZE` and `ONE_TOKEN`."""
    by_tokens = {image_tokens(w, h): (w, h) for w, h in reversed(sizes)}
    return [*reversed(by_tokens.values()), ODD_SIZE, ONE_TOKEN]


def use_compile_cache(cache_dir: Path) -> None:
    """Point inductor's caches at `cache_dir`; an unwritable one is a warning (inductor keeps its own)."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(cache_dir, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as error:
        log.warning(
            "compile: FLUX_DAY_COMPILE_CACHE=%s cannot be written (%s); compiled kernels are not kept "
            "across restarts",
            cache_dir,
            error.strerror or type(error).__name__,
        )
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)


def repeated_blocks(transformer: nn.Module) -> list[nn.Module]:
    names = set(getattr(transformer, "_repeated_blocks", ()))
    return [module for module in transformer.modules() if type(module).__name__ in names]


class CompiledTransformers:
    """Compiles transformers' repeated blocks (`install`) and runs them at each warm-up size (`warm_up`)."""

    def __init__(self, backend: str, sizes: Sequence[tuple[int, int]], cache_dir: Path | None) -> None:
        self.backend = backend
        self.sizes = warm_up_sizes(sizes)
        self.options = INDUCTOR_OPTIONS if backend == "inductor" else None
        if cache_dir is not None and backend == "inductor":
            use_compile_cache(cache_dir)
        self.transformers: list[nn.Module] = []

    def install(self, transformers: Iterable[nn.Module]) -> None:
        """Compile these transformers' repeated blocks (each on its first call), once."""
        for transformer in transformers:
            if any(block._compiled_call_impl is not None for block in repeated_blocks(transformer)):
                continue
            transformer.compile_repeated_blocks(backend=self.backend, dynamic=True, options=self.options)
            self.transformers.append(transformer)
        # One dynamo cache per block class, shared by every transformer: up to four graphs per parameter
        # format (one token or more; text states contiguous or a slice), and room for a split.
        limit = 4 * max(1, len(self.transformers)) + 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 2 * limit
        )

    def warm_up(self, pipe: Any, embeds: dict[str, torch.Tensor], text_tokens: int) -> None:
        for size in self.sizes:
            denoise_latents(pipe, embeds, size, 1, text_tokens)


def denoise_latents(
    pipe: Any,
    embeds: dict[str, torch.Tensor],
    size: tuple[int, int],
    steps: int,
    text_tokens: int,
    generator: torch.Generator | None = None,
) -> Any:
    """`steps` denoising steps of one image at `size` (width, height), latents out: the transformer alone."""
    width, height = size
    with torch.inference_mode():
        return pipe(
            **embeds,
            width=width,
            height=height,
            num_inference_steps=steps,
            max_sequence_length=text_tokens,
            generator=generator,
            output_type="latent",
        )


def encode_prompt(pipe: Any, prompt: str, device: torch.device, text_tokens: int) -> dict[str, torch.Tensor]:
    """`prompt` encoded once, as the pipeline call's keyword arguments."""
    with torch.inference_mode():
        embeds, pooled, _ = pipe.encode_prompt(prompt, None, device, max_sequence_length=text_tokens)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
