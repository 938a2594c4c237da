"""Every LoRA layout trainers write, on a model of FLUX.1's real depth (19 double + 38 single blocks and a
12-layer CLIP, at narrow widths): each fused weight equals independent math, every module of the layout
is applied, restores are bit-exact, and what flux-day cannot apply is refused by name.

Converters that hard-code FLUX.1's widths are also checked at the real width, on the meta device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load
from torch import nn
from transformers import CLIPTextModel

from flux_day.config import Settings
from flux_day.errors import InputError
from flux_day.loras import formats
from flux_day.loras.flux_layout import ModuleIndex
from flux_day.loras.manager import LoraManager
from flux_day.loras.refs import LoraRequest
from flux_day.weights.manifest import DEV_FOLDER
from scripts.random_weights.tree import write_tiny_weights
from tests.harness import lora_layouts as ll
from tests.harness.lora_files import data_uri, to_bytes

Components = dict[str, nn.Module]


@pytest.fixture(scope="session")
def deep_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deep tree (FLUX.1's depth, narrow widths), written once per session."""
    return write_tiny_weights(tmp_path_factory.mktemp("deep-weights"), profile="deep")


@pytest.fixture(scope="module")
def deep(deep_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[LoraManager, Components]:
    """The deep dev transformer and CLIP in float32 (as the CPU engine runs them), and a LoRA manager."""
    dev = deep_weights / DEV_FOLDER
    components: Components = {
        "transformer": FluxTransformer2DModel.from_pretrained(dev / "transformer", torch_dtype=torch.float32),
        "text_encoder": CLIPTextModel.from_pretrained(dev / "text_encoder", torch_dtype=torch.float32),
    }
    cache = tmp_path_factory.mktemp("deep-lora-cache")
    settings = Settings.from_env({"FLUX_DAY_WEIGHTS": str(deep_weights), "FLUX_DAY_LORA_CACHE": str(cache)})
    return LoraManager(settings), components


@pytest.fixture(autouse=True)
def nothing_fused_after(deep: tuple[LoraManager, Components]):
    yield
    deep[0].release()


def parameters(components: Components) -> dict[str, torch.Tensor]:
    return {f"{c}.{n}": p.detach().clone() for c, m in components.items() for n, p in m.named_parameters()}


def activate(deep: tuple[LoraManager, Components], *loras: tuple[str, bytes, float]) -> None:
    manager, components = deep
    requests = [LoraRequest.parse(name, data_uri(data), scale) for name, data, scale in loras]
    manager.activate("dev", components, requests)


def test_the_hand_written_tables_name_every_linear_of_the_deep_model(
    deep: tuple[LoraManager, Components],
) -> None:
    _, components = deep
    linears = {n: m for n, m in components["transformer"].named_modules() if isinstance(m, nn.Linear)}
    assert {n: (m.out_features, m.in_features) for n, m in linears.items()} == ll.transformer_linears(ll.DEEP)
    assert len([n for n in linears if n.startswith("transformer_blocks.")]) == 19 * 14
    assert len([n for n in linears if n.startswith("single_transformer_blocks.")]) == 38 * 6
    clip = {n for n, m in components["text_encoder"].named_modules() if isinstance(m, nn.Linear)}
    assert clip == {model_name for model_name, _ in ll.clip_linears(ll.DEEP).values()}


LAYOUTS: dict[str, Callable[[], tuple[bytes, ll.Expected]]] = {
    "ai-toolkit": lambda: ll.ai_toolkit(seed=1),
    "simpletuner": lambda: ll.simpletuner(seed=2),
    "kohya": lambda: ll.kohya(seed=3),
    "kohya-transformer-only": lambda: ll.kohya(seed=4, text_encoder=False),
    "kohya-split-qkv": lambda: ll.kohya(seed=5, split_qkv=True),
    "onetrainer": lambda: ll.onetrainer(seed=6),
    "onetrainer-with-clip": lambda: ll.onetrainer(seed=7, text_encoder=True),
    "comfyui-diff-and-diff_b": lambda: ll.comfyui(seed=8),
    "xlabs": lambda: ll.xlabs(seed=9),
    "peft-adapter_model": lambda: ll.peft_adapter(seed=10),
    "fal-bare-bfl": lambda: ll.fal(seed=11),
    "fal-base_model": lambda: ll.fal(seed=12, prefix="base_model.model."),
    "lycoris": lambda: ll.lycoris(seed=13),
    "lycoris-kohya-names": lambda: ll.lycoris(seed=14, naming="kohya"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_module_of_each_layout_fuses_to_independent_math_and_restores_bit_exactly(
    deep: tuple[LoraManager, Components], layout: str
) -> None:
    manager, components = deep
    data, expected = LAYOUTS[layout]()
    base = parameters(components)
    activate(deep, ("replicate_weights", data, 0.7))
    fused = parameters(components)
    assert {name for name in base if not torch.equal(base[name], fused[name])} == set(expected)
    for name, update in expected.items():
        torch.testing.assert_close(
            fused[name].double(), base[name].double() + 0.7 * update, rtol=0, atol=2e-6
        )
    manager.release()
    after = parameters(components)
    assert all(torch.equal(base[name], after[name]) for name in base)


@pytest.mark.parametrize("naming", ["lycoris", "kohya"])
def test_a_full_coverage_lycoris_file_is_kept_as_its_factors_not_as_dense_updates(
    deep: tuple[LoraManager, Components], naming: str
) -> None:
    """Parsed, a LoKr/LoHa on every linear holds the file's factors (split targets share them), not a
    dense update per weight: that would be a second transformer in memory per parsed LoRA."""
    _, components = deep
    data, expected = ll.lycoris(seed=15, naming=naming)
    parsed = formats.read_lora(data, ModuleIndex(components), "FLUX.1 [dev]")
    factors = sum(t.numel() * 4 for key, t in load(data).items() if not key.endswith(".alpha"))
    assert parsed.held_bytes == factors
    assert sum(update.numel() * 4 for update in expected.values()) > 4 * factors


def test_two_layouts_together_add_up_and_switching_back_is_bit_exact(
    deep: tuple[LoraManager, Components],
) -> None:
    _, components = deep
    (comfy, comfy_expected), (onetrainer, ot_expected) = ll.comfyui(seed=20), ll.onetrainer(seed=21)
    base = parameters(components)
    activate(deep, ("replicate_weights", comfy, 0.5))
    only_comfy = parameters(components)
    activate(deep, ("replicate_weights", comfy, 0.5), ("extra_lora", onetrainer, -0.8))
    fused = parameters(components)
    for name in {*comfy_expected, *ot_expected}:
        update = 0.5 * comfy_expected.get(name, 0) - 0.8 * ot_expected.get(name, 0)
        torch.testing.assert_close(fused[name].double(), base[name].double() + update, rtol=0, atol=2e-6)
    activate(deep, ("replicate_weights", comfy, 0.5))
    assert all(torch.equal(only_comfy[name], value) for name, value in parameters(components).items())


REFUSED: dict[str, tuple[Callable[[], bytes], str]] = {
    "kohya-with-t5": (ll.kohya_t5, r"T5 text encoder \(lora_te3_\)"),
    "dora-kohya": (
        lambda: ll.with_dora(ll.kohya(seed=1)[0], "lora_unet_double_blocks_0_img_attn_qkv.dora_scale"),
        r"DoRA .*dora_scale",
    ),
    "dora-peft": (
        lambda: ll.with_dora(ll.ai_toolkit(seed=1)[0], "transformer.x_embedder.lora_magnitude_vector"),
        r"DoRA .*lora_magnitude_vector",
    ),
    "control-lora-bfl": (ll.control_lora, r"Control LoRA \(Canny or Depth\) \(its input takes 128 channels"),
    "control-lora-diffusers": (
        lambda: ll.control_lora(diffusers_names=True),
        r"Control LoRA \(Canny or Depth\) \(its input takes 128 channels, FLUX.1's 64\)",
    ),
    "nan": (
        lambda: to_bytes(
            with_value(ll.onetrainer(seed=1)[0], "lora_transformer_proj_out.lora_up.weight", float("nan"))
        ),
        r"'lora_transformer_proj_out.lora_up.weight' holds NaN or infinite values",
    ),
    "inf": (
        lambda: to_bytes(
            with_value(ll.fal(seed=1)[0], "single_blocks.37.linear1.lora_A.weight", float("inf"))
        ),
        r"holds NaN or infinite values",
    ),
    "lora-and-diff-on-one-module": (
        lambda: to_bytes(
            with_value(ll.comfyui(seed=1)[0], "diffusion_model.img_in.lora_up.weight", 1.0, (32, 2))
        ),
        r"both low-rank factors and a full weight update",
    ),
    "diff_b-of-wrong-size": (
        lambda: to_bytes({"diffusion_model.double_blocks.3.img_attn.qkv.diff_b": torch.ones(97)}),
        r"bias update of 'diffusion_model.double_blocks.3.img_attn.qkv' has shape 97",
    ),
    "xlabs-with-unmatched-diff": (
        lambda: to_bytes(with_value(ll.xlabs(seed=1)[0], "nothing.here.diff", 1.0, (4, 4))),
        r"match a module of FLUX.1 \[dev\] \(first unmatched: 'nothing.here'\)",
    ),
}


def with_value(
    data: bytes, key: str, value: float, shape: tuple[int, ...] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of `data` with `key` set to `value` everywhere (created with `shape` if absent)."""
    from safetensors.torch import load

    state_dict = load(data)
    state_dict[key] = torch.full(shape or state_dict[key].shape, value)
    return state_dict


@pytest.mark.parametrize("case", REFUSED)
def test_what_cannot_be_applied_is_refused_by_name_and_changes_nothing(
    deep: tuple[LoraManager, Components], case: str
) -> None:
    manager, components = deep
    good, _ = ll.onetrainer(seed=30)
    activate(deep, ("replicate_weights", good, 1.0))
    before, state = parameters(components), manager.fuser.fused
    make, message = REFUSED[case]
    with pytest.raises(InputError, match=rf"^extra_lora: .*{message}"):
        activate(deep, ("replicate_weights", good, 1.0), ("extra_lora", make(), 1.0))
    assert manager.fuser.fused == state
    assert all(torch.equal(before[name], value) for name, value in parameters(components).items())


def test_a_fused_weight_past_its_dtypes_range_is_refused_and_everything_restored(
    deep: tuple[LoraManager, Components],
) -> None:
    """Finite factors whose product overflows float32 (the CPU model's dtype): refused naming the input."""
    manager, components = deep
    base = parameters(components)
    huge = {
        "transformer.proj_out.lora_A.weight": torch.full((1, 32), 3e19),
        "transformer.proj_out.lora_B.weight": torch.full((64, 1), 3e19),
    }
    with pytest.raises(
        InputError,
        match=r"^replicate_weights: .*'transformer.proj_out' past the largest value .*float32.*lower lora_sc",
    ):
        activate(
            deep, ("extra_lora", ll.ai_toolkit(seed=1)[0], 1.0), ("replicate_weights", to_bytes(huge), 1.0)
        )
    assert not manager.fuser.fused
    assert all(torch.equal(base[name], value) for name, value in parameters(components).items())


def real_width_index() -> ModuleIndex:
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(num_layers=19, num_single_layers=38, guidance_embeds=True)
    return ModuleIndex({"transformer": transformer})


def test_fal_files_at_flux_real_width_agree_with_diffusers_converter() -> None:
    """diffusers' fal converter hard-codes 3072 (and wants every block module and the final linear, which
    fal's trainer writes); at that width its split of each module must equal ours, which assumes no width."""
    from diffusers.loaders.lora_conversion_utils import _convert_fal_kontext_lora_to_diffusers

    index, full = real_width_index(), ll.FluxShape(hidden=3072, mlp=12288, context=4096, pooled=768)
    g = torch.Generator().manual_seed(0)
    fal = {}
    for name in ll.bfl_modules(full):
        if not name.startswith(("double_blocks.", "single_blocks.", "final_layer.linear")):
            continue
        fal[f"base_model.model.{name}.lora_A.weight"] = torch.randn(
            1, ll.bfl_in_features(full, name), generator=g
        )
        fal[f"base_model.model.{name}.lora_B.weight"] = torch.randn(
            ll.bfl_out_features(full, name), 1, generator=g
        )
    ours = formats.read_lora(to_bytes(fal), index, "FLUX.1 [dev]")
    theirs = _convert_fal_kontext_lora_to_diffusers({key: value.clone() for key, value in fal.items()})
    assert {key.removesuffix(".lora_A.weight") for key in theirs if key.endswith("lora_A.weight")} == set(
        ours.deltas
    )
    cpu = torch.device("cpu")
    for module in (
        "transformer_blocks.4.attn.add_k_proj",
        "single_transformer_blocks.30.proj_mlp",
        "proj_out",
    ):
        module = f"transformer.{module}"
        expected = theirs[f"{module}.lora_B.weight"] @ theirs[f"{module}.lora_A.weight"]
        torch.testing.assert_close(ours.deltas[module].rows(slice(None), cpu), expected, msg=module)
