"""The engine on tiny weights: shared components, dtypes, fidelity to diffusers, inpaint semantics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flux_day.config import Settings
from flux_day.engine import Engine
from flux_day.errors import CapacityError, InputError, WeightsError
from flux_day.generation import call_arguments
from flux_day.memory_plan import GpuBudget
from flux_day.pipelines import build_pipelines, load_models
from flux_day.request import GenerationRequest
from tests.harness.engines import EngineFactory


def test_schnell_shares_encoders_tokenizers_and_vae_with_dev(engine: Engine) -> None:
    dev, schnell = engine.pipelines["dev-full"]["txt2img"], engine.pipelines["schnell-full"]["txt2img"]
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"):
        assert getattr(dev, name) is getattr(schnell, name), name
    assert dev.transformer is not schnell.transformer
    assert dev.transformer.config.guidance_embeds and not schnell.transformer.config.guidance_embeds


def test_every_mode_pipeline_reuses_the_loaded_modules(engine: Engine) -> None:
    for by_mode in engine.pipelines.values():
        base = by_mode["txt2img"]
        for mode in ("img2img", "inpaint"):
            for name, component in base.components.items():
                assert by_mode[mode].components[name] is component, (mode, name)


def test_auto_device_is_cpu_float32_without_cuda(engine: Engine) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine picks cuda/bf16")
    assert (engine.device.type, engine.dtype) == ("cpu", torch.float32)


def test_building_mode_pipelines_keeps_bf16_weights(tiny_weights: Path) -> None:
    models = load_models(tiny_weights, torch.bfloat16)
    for model, transformer in models.transformers.items():
        for pipe in build_pipelines(models, model, transformer).values():
            dtypes = {
                p.dtype for m in (pipe.transformer, pipe.vae, pipe.text_encoder_2) for p in m.parameters()
            }
            assert dtypes == {torch.bfloat16}


def test_generation_equals_a_bare_diffusers_call(engine: Engine) -> None:
    request = GenerationRequest.from_inputs(
        prompt="a red fox", seed=42, num_inference_steps=3, megapixels="0.25", guidance_scale=3.5
    )
    (ours,) = engine.generate(request).images
    bare = engine.pipelines["dev-full"]["txt2img"](
        prompt="a red fox",
        width=512,
        height=512,
        num_inference_steps=3,
        guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(42),
        max_sequence_length=512,
    ).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(bare))


def test_inpaint_keeps_black_latents_exactly_and_repaints_white(engine: Engine, tmp_path: Path) -> None:
    image = Image.radial_gradient("L").resize((512, 512)).convert("RGB")
    image.save(tmp_path / "image.png")
    left_white = Image.new("L", (512, 512))
    left_white.paste(255, (0, 0, 256, 512))
    left_white.save(tmp_path / "half.png")
    Image.new("L", (512, 512)).save(tmp_path / "none.png")
    pipe = engine.pipelines["dev-full"]["inpaint"]

    def final_latents(mask: str, seed: int) -> torch.Tensor:
        request = GenerationRequest.from_inputs(
            prompt="a fox",
            image=tmp_path / "image.png",
            mask=tmp_path / mask,
            seed=seed,
            num_inference_steps=3,
        )
        packed = pipe(prompt=request.prompt, output_type="latent", **call_arguments(request, seed)).images
        return pipe._unpack_latents(packed, 512, 512, pipe.vae_scale_factor)

    nothing_repainted = final_latents("none.png", seed=1)
    half, half_other_seed = final_latents("half.png", seed=1), final_latents("half.png", seed=2)
    kept = slice(34, None)  # latent columns well inside the black half (the mask edge is column 32)
    assert torch.equal(half[..., kept], nothing_repainted[..., kept])
    # (Another seed samples the image's latent distribution anew, so only the same seed compares.)
    assert not torch.allclose(half[..., :30], nothing_repainted[..., :30], atol=1e-2)
    assert not torch.allclose(half[..., :30], half_other_seed[..., :30], atol=1e-2)


def test_missing_weights_offline_fail_setup_naming_the_folder_and_the_fix(tmp_path: Path) -> None:
    settings = Settings.from_env({"FLUX_DAY_WEIGHTS": str(tmp_path / "empty"), "FLUX_DAY_OFFLINE": "1"})
    with pytest.raises(WeightsError, match=r"missing under .*empty.*FLUX\.1-dev/.*download_weights\.py"):
        Engine(settings)


def test_a_transformer_the_gpu_cannot_hold_is_refused_as_capacity_not_input(
    make_engine: EngineFactory,
) -> None:
    """A plan for a card too small for anything (every component cpu-only) refuses the request by its
    go_fast setting; the request itself is valid, so the refusal is not an InputError."""
    engine = make_engine(budget=GpuBudget(total_bytes=1, reserve_bytes=0))
    with pytest.raises(CapacityError) as raised:
        engine.generate(GenerationRequest.from_inputs(prompt="a fox", go_fast=True))
    assert str(raised.value) == (
        "go_fast: dev-fp8 does not fit this GPU (see the memory plan in the setup log); set go_fast=false."
    )
    assert not isinstance(raised.value, InputError)
