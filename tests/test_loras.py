"""LoRA numerics and state on the tiny model: every layout fuses to independent math, switching is
bit-exact, refusals name the input and leave the weights untouched."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flux_day.config import Settings
from flux_day.engine import Engine
from flux_day.errors import InputError, WeightsError
from flux_day.loras import fuse
from flux_day.loras.formats import Delta
from flux_day.loras.fuse import ScaledDelta, UnrepresentableWeight, WeightFuser
from flux_day.loras.manager import LoraManager
from flux_day.loras.refs import LoraRequest
from flux_day.request import GenerationRequest
from tests.harness import lora_files as lf
from tests.harness.engines import EngineFactory
from tests.harness.http_files import HttpFiles

SMALL = {"num_inference_steps": 2, "aspect_ratio": "1:1", "megapixels": "0.25", "seed": 7}


@pytest.fixture(autouse=True)
def no_loras_after(engine: Engine):
    yield
    activate(engine)


def activate(engine: Engine, *loras: tuple[str, bytes | str, float], model: str = "dev", go_fast=False):
    """Fuse (input name, file bytes or reference, scale) LoRAs the way a request does."""
    requests = [
        LoraRequest.parse(name, lf.data_uri(src) if isinstance(src, bytes) else src, scale)
        for name, src, scale in loras
    ]
    engine.loras.activate(model, engine.lora_components(model), requests, go_fast)


def weights(engine: Engine, model: str = "dev") -> dict[str, torch.Tensor]:
    """A copy of every parameter LoRAs could touch, keyed "transformer.x"/"text_encoder.x"/"t5.x"."""
    pipe = engine.pipelines[f"{model}-full"]["txt2img"]
    parts = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "t5": pipe.text_encoder_2}
    return {f"{c}.{n}": p.detach().clone() for c, m in parts.items() for n, p in m.named_parameters()}


def linear_weights(engine: Engine) -> dict[str, torch.Tensor]:
    """The dev transformer's linear weights by diffusers module name (as harness/lora_files.py names them)."""
    transformer = engine.pipelines["dev-full"]["txt2img"].transformer
    return {n: m.weight.detach().clone() for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}


def image_bytes(engine: Engine, **inputs) -> bytes:
    buffer = io.BytesIO()
    request = GenerationRequest.from_inputs(prompt="a fox", **SMALL, **inputs)
    engine.generate(request.with_default_lora(engine.default_lora)).images[0].save(buffer, "PNG")
    return buffer.getvalue()


LAYOUTS = {
    "kohya": lambda lora: lf.to_bytes(lf.kohya(lora)),
    "bfl": lambda lora: lf.to_bytes(lf.bfl(lora)),
    "peft": lambda lora: lf.to_bytes(*lf.peft(lora)),
    "peft-unprefixed": lambda lora: lf.to_bytes(*lf.peft(lora, prefix="")),
    "ai-toolkit": lambda lora: lf.to_bytes(lf.ai_toolkit(lora)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_fuses_to_w_plus_scaled_b_a(engine: Engine, layout: str) -> None:
    base = linear_weights(engine)
    lora = lf.random_lora(1, rank=4, alpha=8.0)
    activate(engine, ("replicate_weights", LAYOUTS[layout](lora), 0.7))
    fused = linear_weights(engine)
    expected = lf.expected_weights(base, [(lora, 0.7)])
    assert set(expected) == {name for name in base if not torch.equal(base[name], fused[name])}
    for name, value in expected.items():
        torch.testing.assert_close(fused[name].double(), value, rtol=0, atol=1e-5, msg=name)


def test_kohya_bfl_and_peft_files_of_one_lora_fuse_to_the_same_weights(engine: Engine) -> None:
    lora = lf.random_lora(2, rank=8, alpha=4.0)
    results = {}
    for layout in ("kohya", "bfl", "peft"):
        activate(engine, ("replicate_weights", LAYOUTS[layout](lora), 1.0))
        results[layout] = linear_weights(engine)
    for layout in ("bfl", "peft"):
        for name, value in results["kohya"].items():
            torch.testing.assert_close(results[layout][name], value, rtol=0, atol=1e-6, msg=(layout, name))


def test_xlabs_layout_fuses_to_its_math(engine: Engine) -> None:
    base = linear_weights(engine)
    g = torch.Generator().manual_seed(3)
    qkv_down, qkv_up = torch.randn(4, 32, generator=g), torch.randn(96, 4, generator=g)
    proj_down, proj_up = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)
    xlabs = {
        "double_blocks.0.processor.qkv_lora1.down.weight": qkv_down,
        "double_blocks.0.processor.qkv_lora1.up.weight": qkv_up,
        "double_blocks.0.processor.proj_lora1.down.weight": proj_down,
        "double_blocks.0.processor.proj_lora1.up.weight": proj_up,
    }
    activate(engine, ("replicate_weights", lf.to_bytes(xlabs), 0.5))
    fused = linear_weights(engine)
    for name, rows in (("to_q", slice(0, 32)), ("to_k", slice(32, 64)), ("to_v", slice(64, 96))):
        module = f"transformer_blocks.0.attn.{name}"
        expected = base[module].double() + 0.5 * (qkv_up[rows].double() @ qkv_down.double())
        torch.testing.assert_close(fused[module].double(), expected, rtol=0, atol=1e-5)
    expected = base["transformer_blocks.0.attn.to_out.0"].double() + 0.5 * (
        proj_up.double() @ proj_down.double()
    )
    torch.testing.assert_close(
        fused["transformer_blocks.0.attn.to_out.0"].double(), expected, rtol=0, atol=1e-5
    )


def test_lycoris_lokr_and_loha_fuse_to_their_formulas(engine: Engine) -> None:
    base = linear_weights(engine)
    g = torch.Generator().manual_seed(4)
    w1, w2_a, w2_b = (
        torch.randn(4, 4, generator=g),
        torch.randn(8, 2, generator=g),
        torch.randn(2, 8, generator=g),
    )
    h = [torch.randn(*shape, generator=g) for shape in ((96, 2), (2, 32), (96, 2), (2, 32))]
    lycoris = {
        "lora_unet_double_blocks_0_img_attn_proj.lokr_w1": w1,
        "lora_unet_double_blocks_0_img_attn_proj.lokr_w2_a": w2_a,
        "lora_unet_double_blocks_0_img_attn_proj.lokr_w2_b": w2_b,
        "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(1.0),
        "lora_unet_double_blocks_1_txt_attn_qkv.hada_w1_a": h[0],
        "lora_unet_double_blocks_1_txt_attn_qkv.hada_w1_b": h[1],
        "lora_unet_double_blocks_1_txt_attn_qkv.hada_w2_a": h[2],
        "lora_unet_double_blocks_1_txt_attn_qkv.hada_w2_b": h[3],
        "lora_unet_double_blocks_1_txt_attn_qkv.alpha": torch.tensor(4.0),
    }
    activate(engine, ("extra_lora", lf.to_bytes(lycoris), 1.0))
    fused = linear_weights(engine)
    lokr = torch.kron(w1.double(), w2_a.double() @ w2_b.double()) * (1.0 / 2)
    module = "transformer_blocks.0.attn.to_out.0"
    torch.testing.assert_close(fused[module].double(), base[module].double() + lokr, rtol=0, atol=1e-5)
    loha = (h[0].double() @ h[1].double()) * (h[2].double() @ h[3].double()) * (4.0 / 2)
    for name, rows in (
        ("add_q_proj", slice(0, 32)),
        ("add_k_proj", slice(32, 64)),
        ("add_v_proj", slice(64, 96)),
    ):
        module = f"transformer_blocks.1.attn.{name}"
        torch.testing.assert_close(
            fused[module].double(), base[module].double() + loha[rows], rtol=0, atol=1e-5
        )


def test_final_layer_modulation_halves_are_swapped_into_diffusers_order(engine: Engine) -> None:
    """BFL's final adaLN emits (shift, scale), diffusers' norm_out (scale, shift); alpha still applies."""
    base = linear_weights(engine)["norm_out.linear"].double()
    g = torch.Generator().manual_seed(5)
    down, up = torch.randn(2, 32, generator=g), torch.randn(64, 2, generator=g)
    key = "lora_unet_final_layer_adaLN_modulation_1"
    kohya = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0)}
    activate(engine, ("replicate_weights", lf.to_bytes(kohya), 1.0))
    swapped = torch.cat([up[32:], up[:32]]).double()
    expected = base + 0.5 * (swapped @ down.double())
    torch.testing.assert_close(
        linear_weights(engine)["norm_out.linear"].double(), expected, rtol=0, atol=1e-5
    )


def test_text_encoder_loras_are_applied_to_clip(engine: Engine) -> None:
    clip = engine.pipelines["dev-full"]["txt2img"].text_encoder
    module = clip.get_submodule("encoder.layers.0.self_attn.q_proj")
    base = module.weight.detach().clone().double()
    g = torch.Generator().manual_seed(6)
    down, up = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    key = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    kohya = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(4.0)}
    activate(engine, ("replicate_weights", lf.to_bytes(kohya), 1.0))
    expected = base + 2.0 * (up.double() @ down.double())
    torch.testing.assert_close(module.weight.detach().double(), expected, rtol=0, atol=1e-5)


def test_t5_loras_are_refused_by_name_unless_they_are_all_zero(engine: Engine) -> None:
    lora = lf.kohya(lf.random_lora(1, modules=("double_blocks.0.img_attn.proj",)))
    t5 = {
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.ones(2, 32),
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.ones(32, 2),
    }
    with pytest.raises(InputError, match=r"^replicate_weights: .*T5 text encoder"):
        activate(engine, ("replicate_weights", lf.to_bytes(lora | t5), 1.0))
    zeros = {key: torch.zeros_like(value) for key, value in t5.items()}
    activate(engine, ("replicate_weights", lf.to_bytes(lora | zeros), 1.0))
    assert len(engine.loras.fuser.fused) == 1


def test_a_lora_for_another_model_is_refused_with_the_count_that_matched(engine: Engine) -> None:
    lora = lf.kohya(lf.random_lora(1))  # 6 modules of the tiny model
    extra = lf.kohya(lf.random_lora(1, modules=("double_blocks.0.img_attn.proj",)))
    lora |= {key.replace("double_blocks_0", "double_blocks_9"): value for key, value in extra.items()}
    with pytest.raises(
        InputError, match=r"^extra_lora: 6 of 7 modules .* match .*'lora_unet_double_blocks_9"
    ):
        activate(engine, ("extra_lora", lf.to_bytes(lora), 1.0))
    unknown = {"foo.lora_A.weight": torch.ones(2, 32), "foo.lora_B.weight": torch.ones(32, 2)}
    with pytest.raises(InputError, match=r"^extra_lora: 0 of 1 modules"):
        activate(engine, ("extra_lora", lf.to_bytes(unknown), 1.0))


BAD_FILES = {
    "random bytes": (b"\x13\x00\x00\x00\x00\x00\x00\x00not json at all", r"not a safetensors file"),
    "truncated": (lf.to_bytes(lf.kohya(lf.random_lora(1)))[:-100], r"not a safetensors file"),
    "integer tensors": (
        lf.to_bytes({"a.lora_A.weight": torch.ones(2, 2, dtype=torch.int32)}),
        "not floating",
    ),
    "no lora keys": (lf.to_bytes({"model.weight": torch.ones(2, 2)}), r"not part of a LoRA"),
    "wrong in_features": (
        lf.to_bytes(
            {
                "transformer.proj_out.lora_A.weight": torch.ones(2, 48),
                "transformer.proj_out.lora_B.weight": torch.ones(64, 2),
            }
        ),
        r"does not fit FLUX\.1 \[dev\]",
    ),
    "rank mismatch": (
        lf.to_bytes(
            {
                "lora_unet_final_layer_linear.lora_down.weight": torch.ones(2, 32),
                "lora_unet_final_layer_linear.lora_up.weight": torch.ones(64, 3),
            }
        ),
        r"does not fit|cannot be read",
    ),
}


def pickle_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("case", [*BAD_FILES, "pickle"])
def test_bad_files_are_refused_naming_the_input_and_change_nothing(engine: Engine, case: str) -> None:
    good = lf.to_bytes(lf.kohya(lf.random_lora(1)))
    activate(engine, ("replicate_weights", good, 1.0))
    before, state = weights(engine), engine.loras.fuser.fused
    data, message = BAD_FILES.get(
        case, (pickle_bytes(), r"not a safetensors file but a PyTorch pickle .* never loaded")
    )
    with pytest.raises(InputError, match=rf"^extra_lora: .*({message})"):
        activate(engine, ("replicate_weights", good, 1.0), ("extra_lora", data, 1.0))
    assert engine.loras.fuser.fused == state
    after = weights(engine)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_base_a_b_both_none_leaves_every_weight_bit_identical(engine: Engine) -> None:
    start = {model: weights(engine, model) for model in ("dev", "schnell")}
    a, b = lf.to_bytes(lf.kohya(lf.random_lora(10))), lf.to_bytes(*lf.peft(lf.random_lora(11)))
    activate(engine, ("replicate_weights", a, 1.0))
    first_a = weights(engine)
    activate(engine, ("replicate_weights", b, 0.8))
    activate(engine, ("replicate_weights", a, 1.0), ("extra_lora", b, 0.6))
    activate(engine, ("replicate_weights", a, 1.0), model="schnell")
    activate(engine, ("replicate_weights", a, 1.0))
    again_a = weights(engine)
    assert all(torch.equal(first_a[name], again_a[name]) for name in first_a)
    # A request restores what it runs on; schnell keeps its LoRA until a schnell request drops it.
    activate(engine)
    activate(engine, model="schnell")
    for model in ("dev", "schnell"):
        end = weights(engine, model)
        changed = [name for name in start[model] if not torch.equal(start[model][name], end[name])]
        assert changed == [], (model, changed[:3])


def test_main_and_extra_are_order_independent_and_add_up(engine: Engine) -> None:
    base = linear_weights(engine)
    a, b = lf.random_lora(20), lf.random_lora(21, rank=2, alpha=1.0)
    file_a, file_b = lf.to_bytes(lf.kohya(a)), lf.to_bytes(lf.bfl(b))
    activate(engine, ("replicate_weights", file_a, 0.9), ("extra_lora", file_b, 0.4))
    one = linear_weights(engine)
    activate(engine, ("replicate_weights", file_b, 0.4), ("extra_lora", file_a, 0.9))
    two = linear_weights(engine)
    assert all(torch.equal(one[name], two[name]) for name in one)
    for name, value in lf.expected_weights(base, [(a, 0.9), (b, 0.4)]).items():
        torch.testing.assert_close(one[name].double(), value, rtol=0, atol=1e-5, msg=name)


def test_the_same_loras_are_not_fused_again(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    lora = lf.to_bytes(lf.kohya(lf.random_lora(1)))
    activate(engine, ("replicate_weights", lora, 1.0))
    fuses = []
    monkeypatch.setattr(
        WeightFuser, "_fuse", lambda self, param, parts: fuses.append(param) or torch.tensor(True)
    )
    activate(engine, ("replicate_weights", lora, 1.0))
    assert fuses == []
    activate(engine, ("replicate_weights", lora, 0.5))
    assert len(fuses) == len(engine.loras.fuser.fused) > 0


def test_a_manager_given_lora_bytes_reads_through_them_and_reads_again_after_forget_parsed(
    engine: Engine,
) -> None:
    """The benchmarks' hooks: `lora_bytes` stands in for the download and fuses as that file's data: URI
    does; `forget_parsed` makes the next use read again."""
    data = lf.to_bytes(lf.kohya(lf.random_lora(40)))
    url = "https://example.com/never-fetched.safetensors"
    reads: list[str] = []

    def lora_bytes(lora: LoraRequest) -> bytes:
        reads.append(lora.ref.location)
        return data

    activate(engine, ("replicate_weights", data, 1.0))
    expected = weights(engine)
    original = engine.loras
    engine.loras.release()
    engine.loras = LoraManager(engine.settings, original.fuser, lora_bytes=lora_bytes)
    try:
        activate(engine, ("replicate_weights", url, 1.0))
        activate(engine)
        activate(engine, ("replicate_weights", url, 1.0))
        assert reads == [url]
        fused = weights(engine)
        assert all(torch.equal(fused[name], expected[name]) for name in expected)
        engine.loras.forget_parsed()
        activate(engine, ("replicate_weights", url, 1.0))
        assert reads == [url, url]
    finally:
        engine.loras.release()
        engine.loras = original


def test_a_failure_while_fusing_restores_every_weight(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = weights(engine)
    calls = []
    real = fuse.fused_weight

    def failing(*args: object) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory")
        return real(*args)

    monkeypatch.setattr(fuse, "fused_weight", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        activate(engine, ("replicate_weights", lf.to_bytes(lf.kohya(lf.random_lora(1))), 1.0))
    end = weights(engine)
    assert all(torch.equal(start[name], end[name]) for name in start)
    assert not engine.loras.fuser.fused


def test_go_fast_applies_the_promised_one_and_a_half_times_scale(fast_engine: Engine) -> None:
    engine = fast_engine
    lora = lf.to_bytes(lf.kohya(lf.random_lora(1)))
    activate(engine, ("replicate_weights", lora, 1.0), go_fast=True)
    fast = linear_weights(engine)
    activate(engine, ("replicate_weights", lora, 1.5))
    assert all(torch.equal(fast[name], value) for name, value in linear_weights(engine).items())


def test_bfloat16_weights_fuse_with_one_rounding_and_restore_exactly() -> None:
    linear = nn.Linear(16, 8).to(torch.bfloat16)
    pristine = linear.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    delta = Delta(torch.randn(8, 2, generator=g), torch.randn(2, 16, generator=g), 0.5)
    fuser = WeightFuser()
    fuser.apply({linear.weight: [ScaledDelta("a", delta, 0.8)]})
    expected = (pristine.float() + 0.8 * (0.5 * (delta.up @ delta.down))).to(torch.bfloat16)
    assert torch.equal(linear.weight.detach(), expected)
    fuser.apply({})
    assert torch.equal(linear.weight.detach(), pristine)


@pytest.mark.parametrize(("dtype", "size"), [(torch.float16, 7e4), (torch.bfloat16, 3.4e38)])
def test_a_fused_weight_past_its_dtypes_largest_value_is_refused_and_restored(
    dtype: torch.dtype, size: float
) -> None:
    """fp16 tops out at 65504, bf16 at ~3.39e38: a sum beyond rounds to inf and would make images NaN."""
    linear = nn.Linear(16, 8).to(dtype)
    other = nn.Linear(16, 8).to(dtype)
    pristine, other_pristine = linear.weight.detach().clone(), other.weight.detach().clone()
    tame = Delta(torch.full((8, 1), 0.1), torch.full((1, 16), 0.1), 1.0)
    huge = Delta(torch.full((8,), size).diag()[:, :1], torch.ones(1, 16), 1.0)  # one row past the limit
    fuser = WeightFuser()
    plan = {
        other.weight: [ScaledDelta("a", tame, 1.0)],
        linear.weight: [ScaledDelta("a", tame, 1.0), ScaledDelta("b", huge, 1.0)],
    }
    with pytest.raises(UnrepresentableWeight) as raised:
        fuser.apply(plan)
    assert raised.value.param is linear.weight and raised.value.orders == ("b",)
    assert torch.equal(linear.weight.detach(), pristine) and torch.equal(
        other.weight.detach(), other_pristine
    )
    assert not fuser.fused


def test_lora_scale_zero_gives_the_base_image_and_fetches_nothing(engine: Engine) -> None:
    base = image_bytes(engine)
    unreachable = "http://127.0.0.1:9/never.safetensors"
    assert image_bytes(engine, replicate_weights=unreachable, lora_scale=0) == base
    with_lora = image_bytes(engine, replicate_weights=lf.data_uri(lf.to_bytes(lf.kohya(lf.random_lora(1)))))
    assert with_lora != base
    assert image_bytes(engine) == base


def test_a_default_lora_from_cog_weights_applies_when_replicate_weights_is_empty(
    engine: Engine, make_engine: EngineFactory, tmp_path: Path
) -> None:
    file_a, file_b = lf.to_bytes(lf.kohya(lf.random_lora(30))), lf.to_bytes(lf.kohya(lf.random_lora(31)))
    (tmp_path / "lora.safetensors").write_bytes(file_a)
    trained = make_engine(default_lora=str(tmp_path))
    assert image_bytes(trained, lora_scale=0.5) == image_bytes(
        engine, replicate_weights=lf.data_uri(file_a), lora_scale=0.5
    )
    assert image_bytes(trained, replicate_weights=lf.data_uri(file_b)) == image_bytes(
        engine, replicate_weights=lf.data_uri(file_b)
    )
    (tmp_path / "lora.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match=r"^COG_WEIGHTS: .*not a safetensors file"):
        make_engine(default_lora=str(tmp_path / "lora.safetensors"))


def test_images_with_a_lora_differ_from_the_base(engine: Engine) -> None:
    base = np.asarray(
        engine.generate(GenerationRequest.from_inputs(prompt="a fox", **SMALL)).images[0], dtype=float
    )
    lora = lf.data_uri(lf.to_bytes(lf.kohya(lf.random_lora(1))))
    request = GenerationRequest.from_inputs(prompt="a fox", replicate_weights=lora, **SMALL)
    changed = np.asarray(engine.generate(request).images[0], dtype=float)
    assert np.abs(changed - base).mean() > 1.0


def test_full_size_kohya_files_split_by_the_layout_table_agree_with_diffusers_converter() -> None:
    """At FLUX.1's real widths diffusers' kohya converter works; our split must give its updates."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    from flux_day.loras import formats
    from flux_day.loras.flux_layout import ModuleIndex

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(num_layers=19, num_single_layers=38, guidance_embeds=True)
    index = ModuleIndex({"transformer": transformer})
    g = torch.Generator().manual_seed(0)
    shapes = {"double_blocks_3_img_attn_qkv": (9216, 3072), "single_blocks_20_linear1": (21504, 3072)}
    kohya = {}
    for name, (rows, columns) in shapes.items():
        kohya[f"lora_unet_{name}.lora_down.weight"] = torch.randn(2, columns, generator=g)
        kohya[f"lora_unet_{name}.lora_up.weight"] = torch.randn(rows, 2, generator=g)
        kohya[f"lora_unet_{name}.alpha"] = torch.tensor(1.0)
    parsed = formats.read_lora(lf.to_bytes(kohya), index, "FLUX.1 [dev]")
    converted, alphas = FluxLoraLoaderMixin.lora_state_dict(
        {key: value.clone() for key, value in kohya.items()}, return_alphas=True
    )
    theirs = {key.removesuffix(".lora_A.weight") for key in converted if key.endswith(".lora_A.weight")}
    assert set(parsed.deltas) == theirs and len(theirs) == 3 + 4
    cpu = torch.device("cpu")
    for module in theirs:
        up, down = converted[f"{module}.lora_B.weight"], converted[f"{module}.lora_A.weight"]
        alpha = (alphas or {}).get(f"{module}.alpha")
        expected = up @ down * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
        torch.testing.assert_close(parsed.deltas[module].rows(slice(None), cpu), expected, msg=module)


def test_a_downloaded_lora_is_parsed_from_its_cache_file_as_its_bytes_are(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached file is read through safetensors from its path (a LoRA may be 2 GB), never into
    Python bytes first, and gives what the same file's bytes give: tensors, PEFT metadata, digest."""
    data = lf.to_bytes(*lf.peft(lf.random_lora(40, rank=4, alpha=2.0)))  # alpha/rank from the metadata
    settings = Settings.from_env({"FLUX_DAY_WEIGHTS": str(tmp_path), "FLUX_DAY_ALLOW_PRIVATE_URLS": "1"})
    manager, components = LoraManager(settings), engine.lora_components("dev")
    from_bytes = manager.weights(LoraRequest.parse("extra_lora", lf.data_uri(data), 1), "dev", components)

    def read_whole(path: Path) -> bytes:
        raise AssertionError(f"{path.name} was read into memory whole")

    monkeypatch.setattr(Path, "read_bytes", read_whole)
    with HttpFiles() as files:
        url = files.serve("/peft.safetensors", data)
        from_file = manager.weights(LoraRequest.parse("replicate_weights", url, 1), "dev", components)
    assert (from_file.digest, from_file.nbytes) == (from_bytes.digest, len(data))
    assert from_file.deltas.keys() == from_bytes.deltas.keys() and from_file.deltas
    for module, delta in from_file.deltas.items():
        expected = from_bytes.deltas[module]
        assert delta.scale == expected.scale == 0.5, module
        assert torch.equal(delta.up, expected.up) and torch.equal(delta.down, expected.down), module


def test_parsed_loras_are_kept_within_their_byte_budget_least_recently_used_leaving_first(
    engine: Engine, tmp_path: Path
) -> None:
    requests = [
        LoraRequest.parse("extra_lora", lf.data_uri(lf.to_bytes(lf.kohya(lf.random_lora(50 + i)))), 1)
        for i in range(3)
    ]
    components = engine.lora_components("dev")
    env = {"FLUX_DAY_WEIGHTS": str(tmp_path)}
    sizes = [LoraManager(Settings.from_env(env)).weights(r, "dev", components).held_bytes for r in requests]
    budget = sizes[0] + max(sizes[1:])  # room for two of them
    manager = LoraManager(Settings.from_env(env | {"FLUX_DAY_PARSED_LORA_BYTES": str(budget)}))
    first, second = (manager.weights(r, "dev", components) for r in requests[:2])
    assert manager.weights(requests[0], "dev", components) is first  # now the most recently used
    manager.weights(requests[2], "dev", components)  # the second leaves
    assert manager.parsed_bytes == sizes[0] + sizes[2] <= budget
    assert manager.weights(requests[0], "dev", components) is first
    assert manager.weights(requests[1], "dev", components) is not second  # parsed again


def test_a_lora_larger_than_the_parsed_budget_is_used_for_its_request_but_not_kept(engine: Engine) -> None:
    data = lf.to_bytes(lf.kohya(lf.random_lora(60)))
    activate(engine, ("replicate_weights", data, 1.0))
    expected = weights(engine)
    original = engine.loras
    small = dataclasses.replace(engine.settings, parsed_lora_bytes=1)
    engine.loras.release()
    engine.loras = LoraManager(small, original.fuser)
    try:
        activate(engine, ("replicate_weights", data, 1.0))
        fused = weights(engine)
        assert all(torch.equal(fused[name], expected[name]) for name in expected)
        assert engine.loras.parsed_bytes == 0
    finally:
        engine.loras.release()
        engine.loras = original


def test_a_parsed_lokr_holds_its_factors_not_the_dense_update(engine: Engine) -> None:
    """A full-size dense copy per LoKr would be a second transformer in memory."""
    g = torch.Generator().manual_seed(8)
    lokr = {
        "lora_unet_single_blocks_0_linear1.lokr_w1": torch.randn(4, 4, generator=g),
        "lora_unet_single_blocks_0_linear1.lokr_w2": torch.randn(224 // 4, 32 // 4, generator=g),
        "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(1.0),
    }
    parsed = engine.loras.weights(
        LoraRequest.parse("extra_lora", lf.data_uri(lf.to_bytes(lokr)), 1),
        "dev",
        engine.lora_components("dev"),
    )
    factors = sum(t.numel() * t.element_size() for k, t in lokr.items() if not k.endswith("alpha"))
    assert len(parsed.deltas) == 4 and parsed.held_bytes == factors
    assert sum(math.prod(d.shape) * 4 for d in parsed.deltas.values()) == 224 * 32 * 4 > 3 * factors
