"""torch.compile (FLUX_DAY_COMPILE), regional: the repeated blocks compiled at setup in a few graphs that
every seed size, odd size and LoRA switch reuses; an fp8 copy runs its own blocks; nobody but
`flux_day.compile` sets inductor's options, and never globally."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from flux_day.compile import (
    INDUCTOR_OPTIONS,
    ODD_SIZE,
    CompiledTransformers,
    compile_backend,
    image_tokens,
    repeated_blocks,
    seed_sizes,
    warm_up_sizes,
)
from flux_day.config import Settings
from flux_day.engine import Engine
from flux_day.errors import SettingsError
from flux_day.request import GenerationRequest
from tests.harness import lora_files as lf
from tests.harness.engines import EngineFactory

SMALL = {"prompt": "a fox", "num_inference_steps": 1, "seed": 1}
LORA_A = lf.data_uri(lf.to_bytes(lf.kohya(lf.random_lora(1))))
LORA_B = lf.data_uri(lf.to_bytes(lf.bfl(lf.random_lora(2))))
SWITCHES = ({"replicate_weights": LORA_A}, {"replicate_weights": LORA_B}, {}, {"extra_lora": LORA_A})
# Per compiled transformer of its own parameter format, each of the two block classes: a graph for one
# token and one for more, the single blocks each again for contiguous and sliced text states.
GRAPHS_PER_FORMAT = 6


def test_the_setting_is_off_on_cpu_by_default_and_inductor_on_cuda() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def backend(value: str, device: torch.device) -> str | None:
        return compile_backend(Settings.from_env({"FLUX_DAY_COMPILE": value}).compile, device)

    assert backend("auto", cpu) is None and backend("", cuda) == "inductor"
    assert backend("0", cuda) is None and backend("off", cuda) is None and backend("1", cpu) == "inductor"
    assert backend("aot_eager", cpu) == "aot_eager"
    with pytest.raises(SettingsError, match=r"^FLUX_DAY_COMPILE='fastest' is not a torch.compile backend"):
        backend("fastest", cpu)


def test_setup_warms_one_size_per_seed_token_count_an_odd_size_and_one_token() -> None:
    sizes = seed_sizes()
    assert len(sizes) == len(set(sizes)) == 22
    assert image_tokens(1344, 768) == image_tokens(768, 1344)  # one shape serves both orientations
    seed_tokens = {image_tokens(w, h) for w, h in sizes}
    warm = [image_tokens(w, h) for w, h in warm_up_sizes(sizes)]
    assert len(warm) == len(set(warm)) == len(seed_tokens) + 2
    assert set(warm[:-2]) == seed_tokens and warm[-2:] == [image_tokens(*ODD_SIZE), 1]
    assert image_tokens(*ODD_SIZE) % 2 == 1 and image_tokens(*ODD_SIZE) not in {256, 512}  # not a text length


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@dataclass(frozen=True)
class Compiled:
    """An engine compiled at setup (dev in full precision and fp8) and the graphs its setup made."""

    engine: Engine
    setup_graphs: int


@pytest.fixture(scope="module")
def compiled(make_engine: EngineFactory, recipe: str, tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    # aot_eager traces exactly as inductor does (same guards), without minutes of C++ builds on CPU.
    torch.compiler.reset()
    counters.clear()
    engine = make_engine(
        recipe=recipe,
        FLUX_DAY_COMPILE="aot_eager",
        FLUX_DAY_COMPILE_MODELS="dev-full,dev-fp8",
        FLUX_DAY_COMPILE_CACHE=str(tmp_path_factory.mktemp("compile-cache")),
        FLUX_DAY_FP8_CACHE="0",
    )
    return Compiled(engine, graphs())


def pixels(engine: Engine, **inputs: object) -> np.ndarray:
    request = GenerationRequest.from_inputs(**{**SMALL, "megapixels": "0.25", **inputs})
    return np.asarray(engine.generate(request).images[0], dtype=np.int16)


def test_setup_compiles_the_repeated_blocks_in_a_few_graphs(compiled: Compiled) -> None:
    engine = compiled.engine
    master = engine.pipelines["dev-full"]["txt2img"].transformer
    fp8 = engine.pipeline("dev", "txt2img", fp8=True).transformer
    for transformer in (master, fp8):
        blocks = repeated_blocks(transformer)
        assert len(blocks) == 4 and all(block._compiled_call_impl is not None for block in blocks)
        assert transformer._compiled_call_impl is None and "forward" not in vars(transformer)
    schnell = engine.pipelines["schnell-full"]["txt2img"].transformer
    assert all(block._compiled_call_impl is None for block in repeated_blocks(schnell))
    # Independent of the number of sizes (12 warmed) and of blocks: two formats, a few graphs each.
    assert 2 <= compiled.setup_graphs <= 2 * GRAPHS_PER_FORMAT


def test_no_seed_size_and_no_lora_switch_compiles_again(compiled: Compiled) -> None:
    engine = compiled.engine
    for aspect_ratio, megapixels in (("1:1", "0.25"), ("16:9", "1"), ("9:21", "0.25")):
        for go_fast in (True, False):
            for loras in SWITCHES:
                inputs = {"aspect_ratio": aspect_ratio, "megapixels": megapixels, "go_fast": go_fast, **loras}
                engine.generate(GenerationRequest.from_inputs(**SMALL, **inputs))
                assert graphs() == compiled.setup_graphs, inputs


def test_odd_sizes_compile_nothing_and_the_budget_is_never_exhausted(
    compiled: Compiled, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    odd = [(272, 400), (400, 272), (608, 288), (16, 16), (16, 32), (512, 256), (720, 528)]
    with caplog.at_level(logging.WARNING):
        for width, height in odd:
            path = tmp_path / f"{width}x{height}.png"
            Image.new("RGB", (width, height), (90, 120, 200)).save(path)
            for go_fast in (True, False):
                request = GenerationRequest.from_inputs(**SMALL, image=str(path), go_fast=go_fast)
                assert (request.width, request.height) == (width, height)
                compiled.engine.generate(request)
                assert graphs() == compiled.setup_graphs, (width, height, go_fast)
    assert "recompile_limit" not in caplog.text and "cache_size_limit" not in caplog.text


def test_a_compiled_engines_go_fast_runs_its_own_fp8_copy(compiled: Compiled, fast_engine: Engine) -> None:
    """The fp8 copy is built from a compiled master: it must run its own blocks, not the master's."""
    engine = compiled.engine
    master = engine.pipelines["dev-full"]["txt2img"].transformer
    fp8 = engine.pipeline("dev", "txt2img", fp8=True).transformer
    for ours, masters in zip(repeated_blocks(fp8), repeated_blocks(master), strict=True):
        assert ours._compiled_call_impl is not masters._compiled_call_impl
    for loras in ({}, {"replicate_weights": LORA_A}):
        fast = pixels(engine, go_fast=True, **loras)
        assert np.abs(fast - pixels(engine, **loras)).mean() > 0  # not the full-precision image
        uncompiled = pixels(fast_engine, go_fast=True, **loras)
        assert np.abs(fast - uncompiled).max() <= 2, loras  # aot_eager's numerics: the same image


def test_building_fp8_copies_and_fusing_leave_inductors_config_alone(
    make_engine: EngineFactory, recipe: str
) -> None:
    # One option torchao's setter turns on is off first, so a leak shows whatever ran before this test.
    with torch._inductor.config.patch(coordinate_descent_tuning=False):
        before = torch._inductor.config.get_config_copy()
        engine = make_engine(recipe=recipe, FLUX_DAY_FP8_CACHE="0")
        pixels(engine, go_fast=True, replicate_weights=LORA_A)  # dev's fp8 copy built, a LoRA fused
        engine.pipeline("schnell", "txt2img", fp8=True)
        after = torch._inductor.config.get_config_copy()
    assert {key for key in before if before[key] != after[key]} == set()


def test_inductors_options_go_with_each_compile_and_only_inductors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert CompiledTransformers("inductor", seed_sizes(), None).options == INDUCTOR_OPTIONS
    assert CompiledTransformers("aot_eager", seed_sizes(), None).options is None
    assert INDUCTOR_OPTIONS["epilogue_fusion"] is False and INDUCTOR_OPTIONS["coordinate_descent_tuning"]


def test_the_compile_cache_is_inductors_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    CompiledTransformers("inductor", seed_sizes(), tmp_path / "compile-cache")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile-cache")
    assert (tmp_path / "compile-cache").is_dir()


def test_an_unwritable_compile_cache_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    (tmp_path / "a-file").write_text("")  # even root cannot make a folder inside a file
    with caplog.at_level(logging.WARNING, logger="flux_day.compile"):
        CompiledTransformers("inductor", seed_sizes(), tmp_path / "a-file" / "compile-cache")
    assert "FLUX_DAY_COMPILE_CACHE=" in caplog.text and "cannot be written" in caplog.text
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # inductor keeps its own temporary folder


RESTART = r"""
import sys, torch
from diffusers import FluxTransformer2DModel
from torch._dynamo.utils import counters
from flux_day.compile import CompiledTransformers
from pathlib import Path
torch.manual_seed(0)
model = FluxTransformer2DModel(
    in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
).eval()
before = torch._inductor.config.get_config_copy()
CompiledTransformers("inductor", [(256, 256)], Path(sys.argv[1])).install([model])
tokens = 64
with torch.inference_mode():
    model(
        hidden_states=torch.randn(1, tokens, 16), encoder_hidden_states=torch.randn(1, 8, 32),
        pooled_projections=torch.randn(1, 32), timestep=torch.ones(1),
        img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(8, 3),
    )
assert torch._inductor.config.get_config_copy() == before  # the options went with the compile
print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
"""


@pytest.mark.slow
def test_a_restarted_process_reuses_the_compiled_artifacts(tmp_path: Path) -> None:
    """Two processes, one cache folder: the second finds every block graph in the FX graph cache."""
    cache = tmp_path / "compile-cache"

    def run() -> tuple[int, int]:
        out = subprocess.run(
            [sys.executable, "-c", RESTART, str(cache)], capture_output=True, text=True, check=True
        ).stdout
        hits, misses = out.split()[-2:]
        return int(hits), int(misses)

    hits, misses = run()
    assert hits == 0 and misses >= 2  # a double and a single block graph at least
    assert run() == (misses, 0)
