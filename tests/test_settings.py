"""Settings: every FLUX_DAY_* value parsed once, a bad one refused in one sentence naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from flux_day.config import Settings, credentials
from flux_day.errors import SettingsError


def test_defaults_follow_the_weights_root() -> None:
    settings = Settings.from_env({"FLUX_DAY_WEIGHTS": "/data/w"})
    assert settings.lora_cache == Path("/data/w/lora-cache") and settings.fp8_cache == Path(
        "/data/w/fp8-cache"
    )
    assert settings.compile_cache == Path("/data/w/compile-cache")
    assert (settings.device, settings.offline, settings.compile) == ("auto", False, "auto")
    assert settings.compile_models == ("dev-fp8", "schnell-fp8")
    assert settings.parsed_lora_bytes == 4 * 1000**3
    assert Settings.from_env({"FLUX_DAY_PARSED_LORA_BYTES": "1000"}).parsed_lora_bytes == 1000
    assert Settings.from_env({"FLUX_DAY_FP8_CACHE": "0"}).fp8_cache is None


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("FLUX_DAY_DEVICE", "gpu", "is not a device; set auto, cuda or cpu."),
        ("FLUX_DAY_OFFLINE", "maybe", "is not a flag; set it to 1 or 0 (or leave it unset)."),
        ("FLUX_DAY_LORA_CACHE_BYTES", "20GB", "is not a number of bytes"),
        ("FLUX_DAY_MAX_LORA_BYTES", "-1", "is not a number of bytes"),
        ("FLUX_DAY_PARSED_LORA_BYTES", "4GB", "is not a number of bytes"),
        ("FLUX_DAY_LORA_RATE_WINDOW", "soon", "is not a number of seconds"),
        ("FLUX_DAY_COMPILE_MODELS", "dev-bf16", "names 'dev-bf16'; set a comma-separated list of dev-full"),
    ],
)
def test_a_bad_setting_is_one_sentence_naming_it(name: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({name: value})
    message = str(raised.value)
    assert message.startswith(f"{name}={value!r} ") and says in message
    assert message.count(". ") <= 1 and "\n" not in message


def test_credentials_are_read_when_asked_not_kept_in_settings() -> None:
    env = {"HF_TOKEN": "hf_x", "REPLICATE_API_TOKEN": "", "CIVITAI_API_TOKEN": "c"}
    tokens = credentials(env)
    assert (tokens.hugging_face, tokens.replicate, tokens.civitai) == ("hf_x", None, "c")
    assert "hf_x" not in repr(Settings.from_env(env))
