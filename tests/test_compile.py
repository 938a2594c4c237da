"""torch.compile (FLUX_DAY_COMPILE): the seed's sizes compiled at setup, odd sizes on one dynamic graph,
no graph added by a LoRA switch, and the recompile budget never exhausted."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from flux_day.compile import CompiledTransformers, compile_backend, image_tokens, seed_sizes
from flux_day.config import Settings
from flux_day.engine import Engine
from flux_day.errors import SettingsError
from flux_day.request import GenerationRequest
from tests.harness import lora_files as lf
from tests.harness.engines import EngineFactory

SMALL = {"prompt": "a fox", "num_inference_steps": 1, "seed": 1}


def test_the_setting_is_off_on_cpu_by_default_and_inductor_on_cuda() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def backend(value: str, device: torch.device) -> str | None:
        return compile_backend(Settings.from_env({"FLUX_DAY_COMPILE": value}).compile, device)

    assert backend("auto", cpu) is None and backend("", cuda) == "inductor"
    assert backend("0", cuda) is None and backend("off", cuda) is None and backend("1", cpu) == "inductor"
    assert backend("aot_eager", cpu) == "aot_eager"
    with pytest.raises(SettingsError, match=r"^FLUX_DAY_COMPILE='fastest' is not a torch.compile backend"):
        backend("fastest", cpu)


def test_the_seed_sizes_are_22_and_a_dozen_token_counts() -> None:
    sizes = seed_sizes()
    assert len(sizes) == len(set(sizes)) == 22
    assert (1024, 1024) in sizes and (512, 512) in sizes and (1344, 768) in sizes
    assert image_tokens(1344, 768) == image_tokens(768, 1344)  # one graph serves both orientations
    assert 8 <= len({image_tokens(w, h) for w, h in sizes}) <= 14


@pytest.fixture(scope="module")
def compiled_engine(make_engine: EngineFactory, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    # aot_eager traces exactly as inductor does (same guards), without minutes of C++ builds on CPU.
    cache = str(tmp_path_factory.mktemp("compile-cache"))
    counters.clear()
    return make_engine(
        FLUX_DAY_COMPILE="aot_eager",
        FLUX_DAY_COMPILE_MODELS="dev-fp8",
        FLUX_DAY_COMPILE_CACHE=cache,
        FLUX_DAY_FP8_CACHE="0",
    )


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_every_seed_size_is_compiled_at_setup_and_a_lora_switch_adds_no_graph(
    compiled_engine: Engine,
) -> None:
    at_setup = graphs()
    tokens = {image_tokens(w, h) for w, h in seed_sizes()}
    assert at_setup == len(tokens)  # one static graph per token count, made before any request
    a = lf.data_uri(lf.to_bytes(lf.kohya(lf.random_lora(1))))
    b = lf.data_uri(lf.to_bytes(lf.bfl(lf.random_lora(2))))
    for aspect_ratio, megapixels in (("1:1", "0.25"), ("16:9", "1"), ("9:21", "0.25")):
        for loras in ({"replicate_weights": a}, {"replicate_weights": b}, {}, {"extra_lora": a}):
            request = GenerationRequest.from_inputs(
                **SMALL, aspect_ratio=aspect_ratio, megapixels=megapixels, go_fast=True, **loras
            )
            compiled_engine.generate(request)
            assert graphs() == at_setup, (aspect_ratio, megapixels, loras)
    compiled_engine.generate(GenerationRequest.from_inputs(**SMALL, megapixels="0.25"))
    assert graphs() == at_setup  # dev in full precision is not compiled (FLUX_DAY_COMPILE_MODELS)


def test_odd_sizes_share_one_dynamic_graph_and_the_budget_is_never_exhausted(
    compiled_engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = graphs()
    odd = [(272, 400), (400, 272), (336, 336), (608, 288), (256, 656), (720, 528)]
    with caplog.at_level(logging.WARNING):
        for width, height in odd:
            path = tmp_path / f"{width}x{height}.png"
            Image.new("RGB", (width, height), (90, 120, 200)).save(path)
            request = GenerationRequest.from_inputs(**SMALL, image=str(path), go_fast=True)
            assert (request.width, request.height) == (width, height)
            compiled_engine.generate(request)
    # img2img follows each image's size: all of them on one graph compiled with dynamic shapes
    # (dynamo may specialise once more on its first symbolic run), never one graph per size.
    assert 1 <= graphs() - before <= 2
    assert "recompile_limit" not in caplog.text and "cache_size_limit" not in caplog.text
    limit = torch._dynamo.config.recompile_limit
    assert limit >= len({image_tokens(w, h) for w, h in seed_sizes()})


def test_the_compile_cache_is_inductors_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    CompiledTransformers("inductor", seed_sizes(), tmp_path / "compile-cache")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile-cache")
    assert (tmp_path / "compile-cache").is_dir()


RESTART = r"""
import sys, time, torch
from torch._dynamo.utils import counters
from flux_day.compile import CompiledTransformers
from pathlib import Path
module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
compiled = CompiledTransformers("inductor", [(256, 256)], Path(sys.argv[1]))
compiled.install([module])
torch.manual_seed(0)
started = time.perf_counter()
with torch.inference_mode():
    module(torch.randn(1, 256, 64))
print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
"""


@pytest.mark.slow
def test_a_restarted_process_reuses_the_compiled_artifacts(tmp_path: Path) -> None:
    """Two processes, one cache folder: the second finds its graph in the FX graph cache."""
    cache = tmp_path / "compile-cache"

    def run() -> tuple[int, int]:
        out = subprocess.run(
            [sys.executable, "-c", RESTART, str(cache)], capture_output=True, text=True, check=True
        ).stdout
        hits, misses = out.split()[-2:]
        return int(hits), int(misses)

    assert run() == (0, 1)
    assert run() == (1, 0)
