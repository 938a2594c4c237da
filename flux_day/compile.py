"""torch.compile for the transformers: the seed's sizes compiled at setup, one dynamic graph for the rest.

FLUX's transformer sees an image only through its token count ((width/16) x (height/16); the
positions are values), so the seed's 22 sizes (11 aspect ratios x 2 megapixel settings) are a dozen
static graphs per transformer. `CompiledTransformers` routes a call by its token count: a seed size
runs its static graph (compiled at setup: the engine runs one step of each), any other size
(img2img follows the input image; `custom`) runs one graph compiled with dynamic shapes on first
use, so odd sizes never recompile and never eat the recompile budget, which is set to what the
static graphs need.

Compiled artifacts persist in `FLUX_DAY_COMPILE_CACHE` (inductor's FX-graph, AOTAutograd and kernel
caches, via `TORCHINDUCTOR_CACHE_DIR`): a restarted server traces again (seconds) but does not
generate or build kernels again (the minutes). LoRA fuses write into the same tensors in place, so a
LoRA switch never invalidates a graph (tests/test_compile.py counts them).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flux_day.errors import SettingsError
from flux_day.sizes import ASPECT_RATIOS, MEGAPIXEL_SIDE_SCALE, SIZE_STEP, aspect_ratio_size

log = logging.getLogger(__name__)


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


def _static_call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return module._flux_day_forward(*args, **kwargs)


def _dynamic_call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # Its own code object: dynamo keeps its cache entries apart from the static graphs'.
    return module._flux_day_forward(*args, **kwargs)


class CompiledTransformers:
    """Installs a token-count router as each transformer's forward, and compiles the seed sizes."""

    def __init__(self, backend: str, sizes: Sequence[tuple[int, int]], cache_dir: Path | None) -> None:
        self.backend = backend
        self.static_tokens = frozenset(image_tokens(w, h) for w, h in sizes)
        self.sizes = list(sizes)
        if cache_dir is not None and backend == "inductor":
            cache_dir.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)  # read by inductor at each compile
        self._static = torch.compile(_static_call, backend=backend, dynamic=False)
        self._dynamic = torch.compile(_dynamic_call, backend=backend, dynamic=True)
        self.transformers: list[nn.Module] = []

    def install(self, transformers: Iterable[nn.Module]) -> None:
        """Route every call of these transformers through the compiled graphs."""
        for transformer in transformers:
            if getattr(transformer, "_flux_day_forward", None) is not None:
                continue
            transformer._flux_day_forward = transformer.forward
            transformer.forward = self._router(transformer)
            self.transformers.append(transformer)
        # One static graph per (transformer, token count) under one code object, plus slack for a
        # graph dynamo splits; the dynamic graphs live under their own. (Dynamo's config: torch 2.13
        # has no public setting for these limits; `torch.compiler.config` holds none.)
        limit = len(self.static_tokens) * max(1, len(self.transformers)) + 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 2 * limit
        )

    def _router(self, transformer: nn.Module) -> Callable[..., Any]:
        static, dynamic, tokens = self._static, self._dynamic, self.static_tokens

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            compiled = static if hidden_states.shape[1] in tokens else dynamic
            return compiled(transformer, hidden_states, *args, **kwargs)

        return forward

    def warm_up(self, pipe: Any, embeds: tuple[torch.Tensor, torch.Tensor], text_tokens: int) -> None:
        """Compile `pipe`'s transformer for every seed size now: one denoising step each, through the
        pipeline itself, so the graphs are guarded on exactly what requests pass."""
        prompt_embeds, pooled = embeds
        for width, height in self.sizes:
            with torch.inference_mode():
                pipe(
                    prompt_embeds=prompt_embeds,
                    pooled_prompt_embeds=pooled,
                    width=width,
                    height=height,
                    num_inference_steps=1,
                    max_sequence_length=text_tokens,
                    output_type="latent",
                )


def encode_nothing(pipe: Any, device: torch.device, text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An empty prompt's embeddings: what compiling at setup feeds the transformer."""
    with torch.inference_mode():
        embeds, pooled, _ = pipe.encode_prompt(
            prompt="", prompt_2=None, device=device, max_sequence_length=text_tokens
        )
    return embeds, pooled
