"""Settings read once from the environment: the contract of DESIGN.md that outside checks rely on."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_GB = 1000**3


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """Everything the environment decides. Credentials are not kept here: they are read per request."""

    weights: Path
    device: str
    offline: bool
    lora_cache: Path
    lora_cache_bytes: int
    max_lora_bytes: int
    min_lora_rate: int  # bytes/s a LoRA download must keep up over every `lora_rate_window_s` seconds
    lora_rate_window_s: float
    allow_private_urls: bool
    replicate_url: str
    civitai_url: str
    hf_endpoint: str
    compile: str  # "auto" (CUDA: inductor; CPU: off), "0", "1", or a torch.compile backend name
    compile_models: tuple[str, ...]  # transformers compiled at setup: "dev-fp8", "schnell-full", ...
    compile_cache: Path  # inductor's caches, so a restarted server does not build kernels again
    fp8_cache: Path | None  # go_fast's fp8 copies, so a restarted server does not quantize again

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the settings contract from `env` (the process environment by default)."""
        env = os.environ if env is None else env
        weights = Path(env.get("FLUX_DAY_WEIGHTS") or "./weights")
        device = (env.get("FLUX_DAY_DEVICE") or "auto").strip().lower()
        if device not in {"auto", "cuda", "cpu"}:
            raise ValueError(f"FLUX_DAY_DEVICE={device!r} is not one of auto, cuda, cpu")
        return cls(
            weights=weights,
            device=device,
            offline=_flag(env.get("FLUX_DAY_OFFLINE")),
            lora_cache=Path(env.get("FLUX_DAY_LORA_CACHE") or weights / "lora-cache"),
            lora_cache_bytes=int(env.get("FLUX_DAY_LORA_CACHE_BYTES") or 20 * _GB),
            max_lora_bytes=int(env.get("FLUX_DAY_MAX_LORA_BYTES") or 2 * _GB),
            min_lora_rate=int(env.get("FLUX_DAY_MIN_LORA_RATE") or 100_000),
            lora_rate_window_s=float(env.get("FLUX_DAY_LORA_RATE_WINDOW") or 30),
            allow_private_urls=_flag(env.get("FLUX_DAY_ALLOW_PRIVATE_URLS")),
            replicate_url=(env.get("FLUX_DAY_REPLICATE_URL") or "https://replicate.com").rstrip("/"),
            civitai_url=(env.get("FLUX_DAY_CIVITAI_URL") or "https://civitai.com").rstrip("/"),
            hf_endpoint=(env.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/"),
            compile=(env.get("FLUX_DAY_COMPILE") or "auto").strip().lower(),
            compile_models=_compile_models(env.get("FLUX_DAY_COMPILE_MODELS")),
            compile_cache=Path(env.get("FLUX_DAY_COMPILE_CACHE") or weights / "compile-cache"),
            fp8_cache=_optional_path(env.get("FLUX_DAY_FP8_CACHE"), weights / "fp8-cache"),
        )


TRANSFORMERS = ("dev-full", "dev-fp8", "schnell-full", "schnell-fp8")
DEFAULT_COMPILE_MODELS = ("dev-fp8", "schnell-fp8")  # go_fast: fp8 pays only together with compilation


def _compile_models(value: str | None) -> tuple[str, ...]:
    if value is None or not value.strip():
        return DEFAULT_COMPILE_MODELS
    names = tuple(dict.fromkeys(name.strip().lower() for name in value.split(",") if name.strip()))
    unknown = [name for name in names if name not in TRANSFORMERS]
    if unknown:
        raise ValueError(
            f"FLUX_DAY_COMPILE_MODELS={value!r} names {unknown[0]!r}; use a comma-separated list of "
            f"{', '.join(TRANSFORMERS)}"
        )
    return names


def _optional_path(value: str | None, default: Path) -> Path | None:
    """A folder setting where `0`/`off` turns the feature off."""
    if value is None or not value.strip():
        return default
    return None if value.strip().lower() in {"0", "off", "false", "no", "none"} else Path(value)
