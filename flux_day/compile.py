"""torch.compile, regional: the transformers' repeated blocks, compiled once with the token count dynamic.

FLUX's transformer is 19 double and 38 single blocks of two classes; everything around them (embeddings,
RoPE, the final norm) is a few small ops. diffusers' `compile_repeated_blocks` compiles each block
class's forward; dynamo keys its graphs on the code and guards on shapes and dtypes, not on which block
instance runs it, so every block of a class runs one graph: a handful of block graphs per setup
instead of a whole-model graph per image size (minutes each on a GPU). The token dimension is dynamic
(`dynamic=True`): the seed's 22 sizes (10 token counts), img2img's sizes that follow the input image and
`custom` sizes all run those graphs. Setup runs one denoising step at each seed token count, at one
odd size (`ODD_SIZE`) and at a single token (dynamo specialises a dimension of size 1: a 16x16 input
image has graphs of its own), so whatever dynamo specialises happens at setup, never in a request.

LoRA fuses write into the same tensors in place (fp8 ones into their qdata and scale), and dynamo
guards a parameter on its metadata, never on its values: a LoRA switch never recompiles.

Compiled artifacts persist in `FLUX_DAY_COMPILE_CACHE` (inductor's FX-graph, AOTAutograd and kernel
caches, via `TORCHINDUCTOR_CACHE_DIR`): a restarted server traces again (seconds for a few blocks) but
does not generate or build kernels again. A folder that cannot be written is a warning: inductor then
uses its own temporary folder, and compiles again after a restart.

Inductor's options are set here, on each compile (`INDUCTOR_OPTIONS`), never in its global config,
which is why the torchao configs say `set_inductor_config=False` (`flux_day.fp8`).
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

# huggingface/flux-fast's choices for FLUX on an H100, passed to inductor with each compile (only
# inductor takes them). `conv_1x1_as_mm` is left out: only the VAE has convolutions, and it is not compiled.
INDUCTOR_OPTIONS: Final[dict[str, Any]] = {
    # Tune each generated Triton kernel's launch configuration beyond inductor's heuristics: paid once
    # per kernel at compile time, kept in the compile cache, faster every step after.
    "coordinate_descent_tuning": True,
    # ... trying every direction at each step of that search, not only the first that helps.
    "coordinate_descent_check_all_directions": True,
    # Leave pointwise epilogues (bias, gates, residual adds) to their own fused kernels instead of
    # matmul-template epilogues, which flux-fast found slower for FLUX's shapes.
    "epilogue_fusion": False,
}
# Not a seed token count, odd, and not a text length (256, 512): the size that makes dynamo settle the
# dynamic graphs at setup, so the first img2img or custom request compiles nothing.
ODD_SIZE: Final = (336, 464)
ONE_TOKEN: Final = (16, 16)  # the smallest img2img size (`sizes.image_size`): one token


def compile_backend(setting: str, device: torch.device) -> str | None:
    """`Settings.compile` ("auto", "off" or a backend name) as a torch.compile backend for `device`,
    or None for no compilation; an unknown backend fails setup naming the setting."""
    if setting == "auto":
        return "inductor" if device.type == "cuda" else None
    if setting == "off":
        return None
    known = {"inductor", *torch.compiler.list_backends(exclude_tags=())}
    if setting not in known:
        raise SettingsError(
            f"FLUX_DAY_COMPILE={setting!r} is not a torch.compile backend; set auto, 0, 1 or one of "
            f"{', '.join(sorted(known))}."
        )
    return setting


def seed_sizes() -> list[tuple[int, int]]:
    """The 22 sizes the schema's aspect ratios and megapixel choices give, as (width, height)."""
    return [aspect_ratio_size(ratio, mp) for mp in MEGAPIXEL_SIDE_SCALE for ratio in ASPECT_RATIOS]


def image_tokens(width: int, height: int) -> int:
    """How many latent tokens FLUX's transformer sees for an image (2x2 patches of an 8x VAE)."""
    return (width // SIZE_STEP) * (height // SIZE_STEP)


def warm_up_sizes(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """One size per token count of `sizes` (the transformer sees nothing else of a size), then `ODD_SIZE`
    and `ONE_TOKEN`."""
    by_tokens = {image_tokens(w, h): (w, h) for w, h in reversed(sizes)}
    return [*reversed(by_tokens.values()), ODD_SIZE, ONE_TOKEN]


def use_compile_cache(cache_dir: Path) -> None:
    """Point inductor's caches at `cache_dir` (read by inductor at each compile); a folder that cannot be
    made or written is a warning, and inductor keeps its own temporary folder."""
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
    """The blocks regional compilation compiles: those whose class the model names in `_repeated_blocks`."""
    names = set(getattr(transformer, "_repeated_blocks", ()))
    return [module for module in transformer.modules() if type(module).__name__ in names]


class CompiledTransformers:
    """Compiles transformers' repeated blocks (`install`) and runs them once per warm-up size (`warm_up`)."""

    def __init__(self, backend: str, sizes: Sequence[tuple[int, int]], cache_dir: Path | None) -> None:
        self.backend = backend
        self.sizes = warm_up_sizes(sizes)
        self.options = INDUCTOR_OPTIONS if backend == "inductor" else None
        if cache_dir is not None and backend == "inductor":
            use_compile_cache(cache_dir)
        self.transformers: list[nn.Module] = []

    def install(self, transformers: Iterable[nn.Module]) -> None:
        """Compile the repeated blocks of these transformers (each on its first call, as torch does)."""
        for transformer in transformers:
            if any(block._compiled_call_impl is not None for block in repeated_blocks(transformer)):
                continue
            transformer.compile_repeated_blocks(backend=self.backend, dynamic=True, options=self.options)
            self.transformers.append(transformer)
        # Dynamo keeps one cache per block class's forward, shared by every transformer: per parameter
        # format (full precision, fp8) up to four graphs (one token or more; the single blocks' text
        # states contiguous or a slice), with room for a split. (torch 2.13 has no public setting.)
        limit = 4 * max(1, len(self.transformers)) + 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 2 * limit
        )

    def warm_up(self, pipe: Any, embeds: tuple[torch.Tensor, torch.Tensor], text_tokens: int) -> None:
        """Run `pipe`'s transformer at every warm-up size now: one denoising step each, through the
        pipeline itself, so the graphs are guarded on exactly what requests pass."""
        for size in self.sizes:
            denoise_latents(pipe, embeds, size, 1, text_tokens)


def denoise_latents(
    pipe: Any,
    embeds: tuple[torch.Tensor, torch.Tensor],
    size: tuple[int, int],
    steps: int,
    text_tokens: int,
    generator: torch.Generator | None = None,
) -> Any:
    """`steps` denoising steps of one image at `size` (width, height) from precomputed prompt
    embeddings, latents out: the transformer's work alone (what compiling warms and benchmarks time)."""
    prompt_embeds, pooled = embeds
    width, height = size
    with torch.inference_mode():
        return pipe(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            width=width,
            height=height,
            num_inference_steps=steps,
            max_sequence_length=text_tokens,
            generator=generator,
            output_type="latent",
        )


def encode_nothing(pipe: Any, device: torch.device, text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An empty prompt's embeddings: what compiling at setup feeds the transformer."""
    with torch.inference_mode():
        embeds, pooled, _ = pipe.encode_prompt(
            prompt="", prompt_2=None, device=device, max_sequence_length=text_tokens
        )
    return embeds, pooled
