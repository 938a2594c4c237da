"""LoRA switches at the level of weights: one write per changed weight, exact math in every dtype,
fp8 copies made once and cached on disk, and offloaded modules that come back pristine."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from torch import nn

import flux_day.fp8
from flux_day.engine import Engine
from flux_day.loras import delta_math, fuse
from flux_day.loras.formats import Delta
from flux_day.loras.fuse import ScaledDelta, WeightFuser, inner_tensors
from flux_day.memory_plan import GpuBudget, plan_memory, pristine_site
from flux_day.pipelines import component_sizes
from flux_day.request import GenerationRequest
from scripts.bench.memory_model import card_offloading_schnell
from tests.harness import lora_files as lf
from tests.harness.engines import RECIPES, EngineFactory

SMALL = {"prompt": "a fox", "num_inference_steps": 2, "megapixels": "0.25", "seed": 3}


def delta(seed: int, rows: int = 8, columns: int = 16, rank: int = 2) -> Delta:
    g = torch.Generator().manual_seed(seed)
    return Delta(torch.randn(rows, rank, generator=g), torch.randn(rank, columns, generator=g), 0.5)


def test_a_switch_writes_each_weight_whose_content_changes_once_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    linears = [nn.Linear(16, 8) for _ in range(3)]
    a, b = delta(1), delta(2)
    fuser = WeightFuser()
    writes: list[torch.Tensor] = []
    real = fuse.fused_weight

    def counted(pristine: torch.Tensor, parts: object, out: torch.Tensor) -> torch.Tensor:
        writes.append(out)
        return real(pristine, parts, out)

    monkeypatch.setattr(fuse, "fused_weight", counted)
    both = {linears[0].weight: [ScaledDelta("a", a, 1.0)], linears[1].weight: [ScaledDelta("b", b, 1.0)]}
    assert len(fuser.apply(both)) == 2 and len(writes) == 2
    # A+B -> A: the weight only B touched is restored by copy, A's is left alone.
    written = fuser.apply({linears[0].weight: [ScaledDelta("a", a, 1.0)]})
    assert len(writes) == 2 and written == {linears[1].weight} and len(fuser.fused) == 1
    # A -> A at another scale: written again, once.
    written = fuser.apply({linears[0].weight: [ScaledDelta("a", a, 0.5)]})
    assert len(writes) == 3 and written == {linears[0].weight}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_one_pass_fuse_is_the_float32_math_rounded_once_in_chunks_too(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delta_math, "CHUNK_ROWS", 3)  # 8 rows: chunks of 3, 3 and 2
    linear = nn.Linear(16, 8).to(dtype)
    pristine = linear.weight.detach().clone()
    a, b = delta(1), delta(2, rank=3)
    dense = Delta(torch.randn(8, 16, generator=torch.Generator().manual_seed(3)), None, 1.0)
    WeightFuser().apply(
        {linear.weight: [ScaledDelta("b", b, 0.4), ScaledDelta("a", a, 0.8), ScaledDelta("c", dense, 0.1)]}
    )
    expected = pristine.double()
    for part_delta, scale in ((a, 0.8), (b, 0.4)):
        expected += scale * part_delta.scale * (part_delta.up.double() @ part_delta.down.double())
    expected += 0.1 * dense.up.double()
    tolerance = 1e-5 if dtype == torch.float32 else 0.0
    if dtype == torch.bfloat16:  # one rounding from the float32 sum: at most half a bf16 step off
        torch.testing.assert_close(linear.weight.double(), expected.to(dtype).double(), rtol=0.008, atol=0)
    else:
        torch.testing.assert_close(linear.weight.double(), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_an_fp8_slot_is_quantize_of_the_master_pristine_plus_the_lora_and_never_writes_the_master(
    recipe: str,
) -> None:
    from flux_day.fp8 import quantized_weight

    config, dtype = RECIPES[recipe].fp8, RECIPES[recipe].dtype
    master = nn.Linear(32, 16, dtype=dtype)
    fp8 = nn.Linear(32, 16, dtype=dtype)
    fp8.weight = nn.Parameter(quantized_weight(master.weight.detach(), config), requires_grad=False)
    before_master, before_fp8 = master.weight.detach().clone(), inner_tensors(fp8.weight)
    before_fp8 = {k: v.clone() for k, v in before_fp8.items()}
    lora = delta(4, rows=16, columns=32)
    fuser = WeightFuser(quantize=lambda w: quantized_weight(w, config))
    fuser.apply({master.weight: [ScaledDelta("a", lora, 1.5)]}, "dev-fp8", {master.weight: fp8.weight})
    assert torch.equal(master.weight, before_master)
    # The same LoRA fused into a copy of the master (checked against independent math elsewhere), then
    # quantized as torchao does: the fp8 layer must be exactly that.
    copy = nn.Linear(32, 16, dtype=dtype)
    copy.weight.data.copy_(before_master)
    WeightFuser().apply({copy.weight: [ScaledDelta("a", lora, 1.5)]})
    exact = before_master.double() + 0.75 * (lora.up.double() @ lora.down.double())
    # float32: the sum itself; bf16: the float32 sum rounded once (at most half a bf16 step off)
    torch.testing.assert_close(
        copy.weight.double(), exact, rtol=1e-5 if dtype == torch.float32 else 0.008, atol=1e-5
    )
    expected = inner_tensors(quantized_weight(copy.weight.detach(), config))
    now = inner_tensors(fp8.weight)
    assert all(torch.equal(now[part], expected[part]) for part in now)
    fuser.apply({}, "dev-fp8")
    assert all(torch.equal(inner_tensors(fp8.weight)[p], before_fp8[p]) for p in before_fp8)


def test_pristine_copies_fill_the_plans_room_on_the_gpu_then_go_to_host_memory() -> None:
    plan = plan_memory({"clip": 10, "dev-full": 50}, device_bytes=100, reserve_bytes=20)
    assert plan.pristine_bytes == 20  # 100 - 20 reserve - 60 resident
    assert pristine_site(plan, 0, 15) == "device" and pristine_site(plan, 15, 5) == "device"
    assert pristine_site(plan, 15, 6) == "host"
    assert pristine_site(plan_memory({"clip": 1}, None), 10**12, 10**12) == "device"  # a CPU engine


@pytest.fixture(scope="module")
def cached_engine(
    make_engine: EngineFactory, tmp_path_factory: pytest.TempPathFactory, recipe: str
) -> EngineFactory:
    """A new engine per call in `recipe`, all sharing one fp8 cache folder (a server restarted on the
    same disk)."""
    cache = str(tmp_path_factory.mktemp(f"fp8-cache-{recipe}"))
    return lambda: make_engine(FLUX_DAY_FP8_CACHE=cache, recipe=recipe)


def pixels(engine: Engine, **inputs: object) -> np.ndarray:
    image = engine.generate(GenerationRequest.from_inputs(**{**SMALL, **inputs})).images[0]
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return np.asarray(image, dtype=np.int16)


def test_fp8_copies_are_made_on_first_use_cached_on_disk_and_read_after_a_restart(
    cached_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lora = lf.data_uri(lf.to_bytes(lf.kohya(lf.random_lora(5))))
    first = cached_engine()
    assert "dev-fp8" not in first.residency.modules  # setup made no fp8 copy
    pixels(first, replicate_weights=lora)  # a LoRA fused into the master before the fp8 copy exists
    with caplog.at_level(logging.INFO, logger="flux_day.fp8"):
        fast = pixels(first, go_fast=True)
        first.fp8_cache.wait()
    assert f"dev fp8 transformer ({type(first.recipe.fp8).__name__}) quantized" in caplog.text
    assert (first.settings.fp8_cache / "dev.safetensors").is_file()
    # A restarted server reads the copy instead of quantizing: the quantizer must not run at all.
    monkeypatch.setattr(flux_day.fp8, "quantized_weight", lambda *args: pytest.fail("quantized again"))
    second = cached_engine()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flux_day.fp8"):
        assert np.array_equal(pixels(second, go_fast=True), fast)  # built from the pristine master
    assert "read from the fp8 cache" in caplog.text
    layers = {
        name: inner_tensors(module.weight)
        for name, module in second.pipeline("dev", "txt2img", True).transformer.named_modules()
        if isinstance(module, nn.Linear)
    }
    theirs = first.pipeline("dev", "txt2img", True).transformer
    first.loras.release()
    for name, parts in layers.items():
        expected = inner_tensors(theirs.get_submodule(name).weight)
        assert all(torch.equal(parts[p], expected[p]) for p in parts), name


def test_an_fp8_cache_made_from_other_weights_is_rebuilt(
    cached_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    engine = cached_engine()
    source = engine.models.sources["schnell"][0]
    engine.pipeline("schnell", "txt2img", True)
    engine.fp8_cache.wait()
    stamp = source.stat()
    import os

    os.utime(source, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))  # the master file changed
    try:
        with caplog.at_level(logging.INFO, logger="flux_day.fp8"):
            cached_engine().pipeline("schnell", "txt2img", True)
        assert "made from other weights; rebuilding" in caplog.text and "quantized" in caplog.text
    finally:
        os.utime(source, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


def test_an_offloaded_model_is_fused_on_its_visit_and_comes_back_pristine(make_engine: EngineFactory) -> None:
    """A CPU "card" that offloads schnell, as 80 GB does at full size: its LoRA is fused into the visiting
    copy, dropped with it when another model takes the slot, and fused again on the next visit."""
    plain = make_engine(FLUX_DAY_FP8_CACHE="0")
    card = GpuBudget(card_offloading_schnell(component_sizes(plain.models, plain.safety)), 0)
    engine = make_engine(FLUX_DAY_FP8_CACHE="0", budget=card)
    assert engine.plan["schnell-full"] == "offloaded" and engine.plan["dev-full"] == "resident"
    lora = lf.data_uri(lf.to_bytes(lf.kohya(lf.random_lora(6))))
    schnell = {"model": "schnell"}
    styled = pixels(engine, **schnell, replicate_weights=lora)
    assert np.array_equal(styled, pixels(plain, **schnell, replicate_weights=lora))
    pixels(engine, model="schnell", go_fast=True)  # schnell-fp8 takes the slot: schnell-full goes home
    assert engine.residency.visitor == "schnell-fp8"
    fuser = engine.loras.fuser
    assert not any(fuser.records[param].group == "schnell-full" for param in fuser.fused)
    master = engine.models.transformers["schnell"]
    for tensor in master.parameters():
        home = engine.residency.home(tensor)
        assert home is not None and tensor.data_ptr() == home.data_ptr()  # at home, never written
    assert np.array_equal(pixels(engine, **schnell), pixels(plain, **schnell))
    assert np.array_equal(pixels(engine, **schnell, replicate_weights=lora), styled)
