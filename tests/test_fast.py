"""go_fast: fp8 transformers in every mode, exactly quantize(master + LoRA), restored bit-exactly."""

from __future__ import annotations

import copy
import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_

from flux_day.engine import Engine
from flux_day.fp8 import quantized_weight
from flux_day.loras.fuse import inner_tensors as _inner
from flux_day.request import GenerationRequest
from tests.harness import lora_files as lf
from tests.harness import lora_layouts as ll
from tests.harness.cog_server import CogServer, data_uri, open_image
from tests.harness.fp8_weights import fp8_model, fp8_state

SMALL = {"prompt": "a fox", "num_inference_steps": 2, "aspect_ratio": "1:1", "megapixels": "0.25", "seed": 5}
LORA = lf.data_uri(lf.to_bytes(lf.kohya(lf.random_lora(1))))
OTHER = lf.data_uri(lf.to_bytes(lf.bfl(lf.random_lora(2, modules=("double_blocks.0.img_attn.proj",)))))


@pytest.fixture(scope="module")
def engine(fast_engine: Engine) -> Engine:
    """Every engine test here runs under both fp8 recipes (ids `weight-only` and `production`)."""
    return fast_engine


def pixels(engine: Engine, **inputs: object) -> np.ndarray:
    request = GenerationRequest.from_inputs(**{**SMALL, **inputs})
    return np.asarray(engine.generate(request).images[0], dtype=np.int16)


def test_each_model_has_an_fp8_transformer_and_the_masters_stay_full_precision(engine: Engine) -> None:
    for model in ("dev", "schnell"):
        fp8, master = fp8_model(engine, model), engine.pipelines[f"{model}-full"]["txt2img"].transformer
        assert fp8 is not master
        fp8_linears = [m for m in fp8.modules() if isinstance(m, nn.Linear)]
        assert fp8_linears and all(type(m.weight).__name__ == "Float8Tensor" for m in fp8_linears)
        assert next(master.parameters()).dtype == engine.recipe.dtype  # bf16 under the CUDA recipe
        # The CUDA recipe quantizes activations per token at run time (`_scaled_mm`); weight-only doesn't.
        dynamic = {m.weight.act_quant_kwargs is not None for m in fp8_linears}
        assert dynamic == {isinstance(engine.recipe.fp8, Float8DynamicActivationFloat8WeightConfig)}
        assert all(type(m.weight) is nn.Parameter for m in master.modules() if isinstance(m, nn.Linear))
        inpaint = engine.pipeline(model, "inpaint", fp8=True)
        assert inpaint.transformer is fp8 and inpaint.vae is engine.pipelines[f"{model}-full"]["txt2img"].vae


@pytest.mark.parametrize("model", ["dev", "schnell"])
def test_go_fast_is_close_to_full_precision_but_not_the_same_run(engine: Engine, model: str) -> None:
    full, fast = pixels(engine, model=model), pixels(engine, model=model, go_fast=True)
    assert 0 < np.abs(full - fast).mean() < 8
    assert np.array_equal(pixels(engine, model=model, go_fast=True), fast)


def test_custom_sizes_run_full_precision_even_with_go_fast(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    custom = {"aspect_ratio": "custom", "width": 256, "height": 256, "replicate_weights": LORA}
    with caplog.at_level(logging.INFO, logger="flux_day.engine"):
        fast = pixels(engine, go_fast=True, **custom)
    assert np.array_equal(fast, pixels(engine, **custom))  # no fp8, and no 1.5x LoRA scale either
    assert "aspect_ratio=custom runs in full precision" in caplog.text


def test_fp8_with_a_lora_is_quantize_of_the_fused_master_and_restores_bit_exactly(engine: Engine) -> None:
    original = fp8_state(engine)
    pixels(engine, go_fast=True, replicate_weights=LORA, extra_lora=OTHER)
    master = engine.pipelines["dev-full"]["txt2img"].transformer
    fused = {
        name
        for name, module in fp8_model(engine).named_modules()
        if isinstance(module, nn.Linear) and module.weight in engine.loras.fuser.fused
    }
    assert len(fused) == 13  # six BFL modules (two qkv, one linear1) = 13 linears; OTHER shares one
    now = fp8_state(engine)
    # go_fast never writes the master: it fuses into the fp8 copy. Fuse the same LoRAs (go_fast's 1.5x
    # included) into the master to compare with quantize(master + LoRA).
    pixels(engine, replicate_weights=LORA, lora_scale=1.5, extra_lora=OTHER, extra_lora_scale=1.5)
    for name, parts in now.items():
        if name in fused:
            expected = _inner(quantized_weight(master.get_submodule(name).weight, engine.recipe.fp8))
            assert all(torch.equal(parts[p], expected[p]) for p in parts), name
            assert not torch.equal(parts["qdata"], original[name]["qdata"]), name
        else:
            assert all(torch.equal(parts[p], original[name][p]) for p in parts), name
    pixels(engine, go_fast=True, replicate_weights=OTHER)
    pixels(engine, go_fast=True)
    after = fp8_state(engine)
    assert all(torch.equal(after[n][p], original[n][p]) for n in original for p in original[n])


TINY = ll.FluxShape(double=2, single=2, clip_layers=2)


def biases(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.bias.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_fp8_layers_take_bias_updates_with_their_master_and_give_them_back(engine: Engine) -> None:
    """ComfyUI's diff_b changes biases, which the fp8 copy keeps in full precision: they follow the master."""
    comfy, expected = ll.comfyui(TINY, seed=3)
    fp8, master = fp8_model(engine), engine.models.transformers["dev"]
    original = biases(fp8)
    pixels(engine, go_fast=True, replicate_weights=lf.data_uri(comfy))
    fused = biases(fp8)
    # go_fast never writes the master: fuse the same update there (with go_fast's 1.5x) to compare.
    pixels(engine, replicate_weights=lf.data_uri(comfy), lora_scale=1.5)
    fused_master = biases(master)
    assert all(torch.equal(fused[name], fused_master[name]) for name in fused)
    changed = {f"transformer.{n}.bias" for n in fused if not torch.equal(fused[n], original[n])}
    assert changed == {
        name for name in expected if name.startswith("transformer.") and name.endswith(".bias")
    }
    pixels(engine, go_fast=True)
    assert all(torch.equal(value, original[name]) for name, value in biases(fp8).items())


def test_go_fast_scales_both_loras_by_one_and_a_half(engine: Engine) -> None:
    fast = pixels(
        engine, go_fast=True, replicate_weights=LORA, lora_scale=0.5, extra_lora=OTHER, extra_lora_scale=0.4
    )
    state = fp8_state(engine)
    pixels(engine, replicate_weights=LORA, lora_scale=0.75, extra_lora=OTHER, extra_lora_scale=0.6)
    pixels_again = pixels(
        engine, go_fast=True, replicate_weights=LORA, lora_scale=0.5, extra_lora=OTHER, extra_lora_scale=0.4
    )
    assert np.array_equal(fast, pixels_again)
    master = engine.pipelines["dev-full"]["txt2img"].transformer
    for name, parts in state.items():
        expected = _inner(quantized_weight(master.get_submodule(name).weight, engine.recipe.fp8))
        assert all(torch.equal(parts[p], expected[p]) for p in parts), name


def png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return data_uri(buffer.getvalue())


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_go_fast_runs_in_every_mode_through_the_cog_server(cog_server: CogServer, mode: str) -> None:
    inputs: dict[str, object] = {**SMALL, "output_format": "png", "replicate_weights": LORA}
    if mode != "txt2img":
        inputs["image"] = png(Image.linear_gradient("L").convert("RGB").resize((256, 256)))
    if mode == "inpaint":
        inputs["mask"] = png(Image.new("L", (256, 256), 255))
    (fast,) = cog_server.images(**inputs, go_fast=True)
    (full,) = cog_server.images(**inputs, go_fast=False)
    assert fast != full
    assert open_image(fast).size == open_image(full).size
    (again,) = cog_server.images(**inputs, go_fast=True)
    assert again == fast


def test_the_layer_by_layer_fp8_copy_is_quantize_of_the_master_and_shares_nothing(engine: Engine) -> None:
    engine.loras.release()
    master, fp8 = engine.models.transformers["dev"], fp8_model(engine)
    reference = copy.deepcopy(master)
    quantize_(reference, engine.recipe.fp8)  # the whole model at once, as torchao documents it
    ours, theirs = fp8.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        mine, expected = _inner(ours[key]), _inner(theirs[key])
        assert type(ours[key]) is type(theirs[key]) and mine.keys() == expected.keys(), key
        assert all(torch.equal(mine[part], expected[part]) for part in mine), key
    master_storage = {t.untyped_storage().data_ptr() for t in [*master.parameters(), *master.buffers()]}
    fp8_storage = {
        inner.untyped_storage().data_ptr()
        for t in [*fp8.parameters(), *fp8.buffers()]
        for inner in _inner(t).values()
    }
    assert not master_storage & fp8_storage
