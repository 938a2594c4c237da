"""torch.compile (FLUX_DAY_COMPILE): one graph per model and size, none added by a LoRA switch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from flux_day.config import Settings
from flux_day.engine import Engine
from flux_day.fast import compile_backend
from flux_day.request import GenerationRequest
from tests import lora_files as lf

SMALL = {"prompt": "a fox", "num_inference_steps": 2, "aspect_ratio": "1:1", "megapixels": "0.25", "seed": 1}


def test_the_setting_is_off_on_cpu_by_default_and_inductor_on_cuda() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_backend("auto", cpu) is None and compile_backend("auto", cuda) == "inductor"
    assert compile_backend("0", cuda) is None and compile_backend("1", cpu) == "inductor"
    assert compile_backend("aot_eager", cpu) == "aot_eager"
    with pytest.raises(ValueError, match="FLUX_DAY_COMPILE='fastest'"):
        compile_backend("fastest", cpu)


def test_a_lora_switch_does_not_recompile(tiny_weights: Path) -> None:
    # aot_eager traces exactly as inductor does (same guards), without minutes of C++ builds on CPU.
    settings = Settings.from_env(
        {"FLUX_DAY_WEIGHTS": str(tiny_weights), "FLUX_DAY_DEVICE": "cpu", "FLUX_DAY_COMPILE": "aot_eager"}
    )
    engine = Engine(settings)
    a = lf.data_uri(lf.to_bytes(lf.kohya(lf.random_lora(1))))
    b = lf.data_uri(lf.to_bytes(lf.bfl(lf.random_lora(2))))
    counters.clear()
    for go_fast in (False, True):
        engine.generate(GenerationRequest.from_inputs(**SMALL, replicate_weights=a, go_fast=go_fast))
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        for loras in ({"replicate_weights": b}, {}, {"replicate_weights": a, "extra_lora": b}):
            engine.generate(GenerationRequest.from_inputs(**SMALL, **loras, go_fast=go_fast))
            assert counters["stats"]["unique_graphs"] == graphs, (go_fast, loras)
    assert counters["stats"]["unique_graphs"] == 2  # dev in full precision and in fp8
