"""Settings read once from the environment (README → Settings), each `FLUX_DAY_*` value parsed here
only, a bad one failing setup with one sentence; credentials are read per request (`credentials()`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flux_day.errors import SettingsError
from flux_day.models import TRANSFORMERS

_GB = 1000**3
TRUE, FALSE = frozenset({"1", "true", "yes", "on"}), frozenset({"", "0", "false", "no", "off"})
NUMBERS = {  # field: (variable, default, parse, what it must be)
    "lora_cache_bytes": ("FLUX_DAY_LORA_CACHE_BYTES", 20 * _GB, int, "a number of bytes"),
    "max_lora_bytes": ("FLUX_DAY_MAX_LORA_BYTES", 2 * _GB, int, "a number of bytes"),
    "parsed_lora_bytes": ("FLUX_DAY_PARSED_LORA_BYTES", 4 * _GB, int, "a number of bytes"),
    "min_lora_rate": ("FLUX_DAY_MIN_LORA_RATE", 100_000, int, "a number of bytes per second"),
    "lora_rate_window_s": ("FLUX_DAY_LORA_RATE_WINDOW", 30.0, float, "a number of seconds"),
}
SERVICE_URLS = {  # field: (variable, default)
    "replicate_url": ("FLUX_DAY_REPLICATE_URL", "https://replicate.com"),
    "civitai_url": ("FLUX_DAY_CIVITAI_URL", "https://civitai.com"),
    "hf_endpoint": ("HF_ENDPOINT", "https://huggingface.co"),
}
TOKENS = {"replicate": "REPLICATE_API_TOKEN", "civitai": "CIVITAI_API_TOKEN", "hugging_face": "HF_TOKEN"}


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = (env.get(name) or "").strip().lower()
    if value not in TRUE | FALSE:
        raise SettingsError(f"{name}={value!r} is not a flag; set it to 1 or 0 (or leave it unset).")
    return value in TRUE


def _number(env: Mapping[str, str], name: str, default: float, parse: type, what: str) -> float:
    value = (env.get(name) or "").strip()
    try:
        parsed = parse(value) if value else default
    except ValueError:
        parsed = -1
    if parsed < 0:
        raise SettingsError(f"{name}={value!r} is not {what}; set {what} (or leave it unset).")
    return parsed


@dataclass(frozen=True)
class Credentials:
    """Tokens for the services LoRAs and base weights come from; each goes only to its own host."""

    replicate: str | None
    civitai: str | None
    hugging_face: str | None


def credentials(env: Mapping[str, str] | None = None) -> Credentials:
    """The tokens set now (read per request, not kept in `Settings`: never logged, rotatable)."""
    env = os.environ if env is None else env
    return Credentials(**{field: env.get(name) or None for field, name in TOKENS.items()})


@dataclass(frozen=True)
class Settings:
    """Everything the environment decides. Credentials are not kept here: they are read per request."""

    weights: Path
    device: str
    offline: bool
    lora_cache: Path
    lora_cache_bytes: int
    max_lora_bytes: int
    parsed_lora_bytes: int  # host memory for parsed LoRAs kept for reuse (least recently used leave first)
    min_lora_rate: int  # bytes/s a LoRA download must keep up over every `lora_rate_window_s` seconds
    lora_rate_window_s: float
    allow_private_urls: bool
    replicate_url: str
    civitai_url: str
    hf_endpoint: str
    compile: str  # "auto" (CUDA: inductor; CPU: off), "off", or a torch.compile backend name
    compile_models: tuple[str, ...]  # transformers compiled at setup: "dev-fp8", "schnell-full", ...
    compile_cache: Path  # inductor's caches, kept across restarts; unwritable: a warning, not a failure
    fp8_cache: Path | None  # go_fast's fp8 copies, so a restarted server does not quantize again

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the settings contract from `env` (the process environment by default)."""
        env = os.environ if env is None else env
        weights = Path(env.get("FLUX_DAY_WEIGHTS") or "./weights")
        device = (env.get("FLUX_DAY_DEVICE") or "auto").strip().lower()
        if device not in {"auto", "cuda", "cpu"}:
            raise SettingsError(f"FLUX_DAY_DEVICE={device!r} is not a device; set auto, cuda or cpu.")
        backend = (env.get("FLUX_DAY_COMPILE") or "auto").strip().lower()
        fp8 = (env.get("FLUX_DAY_FP8_CACHE") or "").strip()
        urls = {
            field: (env.get(name) or default).rstrip("/") for field, (name, default) in SERVICE_URLS.items()
        }
        return cls(
            weights=weights,
            device=device,
            offline=_flag(env, "FLUX_DAY_OFFLINE"),
            lora_cache=Path(env.get("FLUX_DAY_LORA_CACHE") or weights / "lora-cache"),
            allow_private_urls=_flag(env, "FLUX_DAY_ALLOW_PRIVATE_URLS"),
            compile="off" if backend in FALSE else "inductor" if backend in TRUE else backend,
            compile_models=_compile_models(env.get("FLUX_DAY_COMPILE_MODELS") or ""),
            compile_cache=Path(env.get("FLUX_DAY_COMPILE_CACHE") or weights / "compile-cache"),
            fp8_cache=None if fp8.lower() in FALSE - {""} | {"none"} else Path(fp8 or weights / "fp8-cache"),
            **{field: _number(env, *spec) for field, spec in NUMBERS.items()},
            **urls,
        )


def _compile_models(value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip().lower() for name in value.split(",") if name.strip()))
    if unknown := [name for name in names if name not in TRANSFORMERS]:
        raise SettingsError(
            f"FLUX_DAY_COMPILE_MODELS={value!r} names {unknown[0]!r}; set a comma-separated list of "
            f"{', '.join(TRANSFORMERS)}."
        )
    return (
        names if value.strip() else ("dev-fp8", "schnell-fp8")
    )  # go_fast: fp8 pays only together with compilation
