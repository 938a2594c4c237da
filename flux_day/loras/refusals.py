"""What a LoRA file may hold that flux-day does not apply, refused by the name a user knows it by.

Checked on the raw keys, so the refusal says what the file is (a T5 LoRA, a DoRA, a Control LoRA):
diffusers drops several silently, which would give another image than the LoRA's author saw."""

from __future__ import annotations

import torch

from flux_day.errors import LoraError
from flux_day.loras.flux_layout import ModuleIndex

# Key marker -> what it is. An all-zero tensor changes nothing and is dropped; any other is refused.
UNSUPPORTED = {
    ".lora_B.bias": "LoRA bias updates (lora_B.bias)",
    "lora_te2_": "the T5 text encoder (lora_te2_)",
    "lora_te3_": "the T5 text encoder (lora_te3_)",
    "text_encoders.t5xxl.": "the T5 text encoder (t5xxl)",
    "text_encoder_2.": "the T5 text encoder (text_encoder_2)",
    "position_embedding": "position embeddings",
}
# DoRA magnitudes are refused even when zero: a zero magnitude would zero the weight, not leave it.
DORA_MARKERS = ("dora_scale", "lora_magnitude_vector")
# Full norm weights that only FLUX.1 Control LoRAs (Canny, Depth) carry, in BFL and diffusers naming.
CONTROL_NORMS = ("query_norm.scale", "key_norm.scale", ".norm_q.weight", ".norm_k.weight")
INPUT_PROJECTIONS = ("img_in", "x_embedder")
MODULE_PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.", "lora_unet_", "lora_transformer_")


def refuse_unsupported(state_dict: dict[str, torch.Tensor], index: ModuleIndex) -> dict[str, torch.Tensor]:
    """`state_dict` without inert (all-zero) content flux-day cannot apply; anything live is refused."""
    dora = next((key for key in state_dict if any(marker in key for marker in DORA_MARKERS)), None)
    if dora is not None:
        raise LoraError(
            f"this is a DoRA (weight-decomposed LoRA, key {dora[:80]!r}), which flux-day does "
            "not apply; export it as a plain LoRA (without DoRA) and try again."
        )
    _refuse_control_lora(state_dict, index)
    kept = {}
    for key, value in state_dict.items():
        what = next((what for marker, what in UNSUPPORTED.items() if marker in key), None)
        if what is None:
            kept[key] = value
        elif bool(value.any()):
            raise LoraError(
                f"this LoRA changes {what} (key {key[:80]!r}), which flux-day cannot apply; "
                "use a LoRA without them."
            )
    return kept


def _refuse_control_lora(state_dict: dict[str, torch.Tensor], index: ModuleIndex) -> None:
    """BFL's Canny/Depth LoRAs widen the input projection for a control image: refused by name."""
    x_embedder = index.weights.get("transformer.x_embedder")
    channels = x_embedder.shape[1] if x_embedder is not None else None
    widths = [value.shape[1] for key, value in state_dict.items() if _is_input_projection_factor(key, value)]
    widened = [width for width in widths if width != channels]
    if (widened and channels is not None) or any(key.endswith(CONTROL_NORMS) for key in state_dict):
        detail = f" (its input takes {widened[0]} channels, FLUX.1's {channels})" if widened else ""
        raise LoraError(
            f"this is a FLUX.1 Control LoRA (Canny or Depth){detail}: it needs a control "
            "image fed in as extra input channels, which flux-day does not run; use a LoRA made for "
            "plain FLUX.1 [dev] or [schnell]."
        )


def _is_input_projection_factor(key: str, value: torch.Tensor) -> bool:
    """Whether `key` is the input-side factor (or full update) of FLUX's input projection."""
    module = key
    for prefix in MODULE_PREFIXES:
        module = module.removeprefix(prefix)
    suffixes = (".lora_A.weight", ".lora_down.weight", ".diff")
    return module.startswith(INPUT_PROJECTIONS) and key.endswith(suffixes) and value.ndim == 2
