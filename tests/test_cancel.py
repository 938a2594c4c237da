"""A cancelled (or failed) prediction leaves nothing behind: no LoRA fused, no fp8 layer stale, no file.

Cog cancels a running prediction by raising `CancelationException` (a BaseException) into the thread
that runs it, wherever that thread is. These tests raise a BaseException of their own at the same
kinds of places (mid-denoise, mid-fuse, mid-re-quantization, mid-save) and check what a user would
see next: the base weights bit-exactly, and the next prediction's bytes unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import flux_day.fp8
import flux_day.outputs
from flux_day.engine import Engine
from flux_day.outputs import OutputStore
from flux_day.request import GenerationRequest
from tests.harness import lora_files as lf
from tests.harness.fp8_weights import fp8_model, fp8_state

SMALL = {"prompt": "a fox", "num_inference_steps": 3, "aspect_ratio": "1:1", "megapixels": "0.25", "seed": 7}
LORA = lf.data_uri(lf.to_bytes(lf.kohya(lf.random_lora(11))))
OTHER = lf.data_uri(lf.to_bytes(lf.bfl(lf.random_lora(12, modules=("double_blocks.0.img_attn.proj",)))))
BOTH = {"replicate_weights": LORA, "extra_lora": OTHER}


class Cancelled(BaseException):
    """Stands in for cog's CancelationException, which is a BaseException too."""


@pytest.fixture(scope="module")
def engine(fast_engine: Engine) -> Engine:
    """Every test here runs under both fp8 recipes (ids `weight-only` and `production`)."""
    return fast_engine


def request(**inputs: object) -> GenerationRequest:
    return GenerationRequest.from_inputs(**{**SMALL, **inputs})


def pixels(engine: Engine, **inputs: object) -> np.ndarray:
    return np.asarray(engine.generate(request(**inputs)).images[0], dtype=np.int16)


def weights(engine: Engine) -> dict[str, torch.Tensor]:
    """Every weight a LoRA can change, full precision and fp8 (as fp8's inner tensors), copied."""
    state: dict[str, torch.Tensor] = {}
    for model in ("dev", "schnell"):
        for component, module in engine.lora_components(model).items():
            state |= {f"{model}.{component}.{k}": v.clone() for k, v in module.state_dict().items()}
        for name, parts in fp8_state(engine, model).items():
            state |= {f"{model}.fp8.{name}.{part}": tensor for part, tensor in parts.items()}
    return state


def assert_same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, f"{len(changed)} weights differ from the base model, e.g. {changed[:3]}"


@contextmanager
def cancel_on_forward(module: nn.Module, call: int) -> Iterator[None]:
    """Raise `Cancelled` as `module` is called for the `call`-th time (step `call` of the loop)."""
    calls = 0

    def hook(*_: object) -> None:
        nonlocal calls
        calls += 1
        if calls == call:
            raise Cancelled

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("go_fast", [False, True])
def test_a_cancel_mid_denoise_stops_there_and_restores_every_lora(
    engine: Engine, go_fast: bool, caplog: pytest.LogCaptureFixture
) -> None:
    base, styled = pixels(engine, go_fast=go_fast), pixels(engine, go_fast=go_fast, **BOTH)
    engine.loras.release()
    pristine = weights(engine)
    transformer = fp8_model(engine) if go_fast else engine.models.transformers["dev"]
    with (
        caplog.at_level(logging.INFO, logger="flux_day.engine"),
        cancel_on_forward(transformer, call=2),
        pytest.raises(Cancelled),
    ):
        engine.generate(request(go_fast=go_fast, **BOTH))
    assert engine.steps_done == 1  # the step under way when the cancel came was the last one
    assert "request cancelled after 1 of 3 denoising steps; every LoRA restored" in caplog.text
    assert "Cancelled" not in caplog.text  # the prediction's logs name no exception class
    assert not engine.loras.fuser.fused
    assert_same(pristine, weights(engine))
    assert np.array_equal(pixels(engine, go_fast=go_fast), base)
    assert np.array_equal(pixels(engine, go_fast=go_fast, **BOTH), styled)


def test_a_cancel_while_fusing_leaves_the_base_weights(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.loras.release()
    pristine = weights(engine)
    fuse, calls = engine.loras.fuser._fuse, []

    def interrupted(*args: object) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise Cancelled
        fuse(*args)

    monkeypatch.setattr(engine.loras.fuser, "_fuse", interrupted)
    with pytest.raises(Cancelled):
        engine.generate(request(**BOTH))
    assert len(calls) == 3
    assert_same(pristine, weights(engine))


def test_a_cancel_while_re_quantizing_leaves_no_stale_fp8_layer(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.loras.release()
    pristine = weights(engine)
    quantize, calls = flux_day.fp8.quantized_weight, []

    def interrupted(*args: object) -> object:
        calls.append(1)
        if len(calls) == 3:  # two layers already re-quantized with the LoRA in them
            raise Cancelled
        return quantize(*args)

    monkeypatch.setattr(flux_day.fp8, "quantized_weight", interrupted)
    with pytest.raises(Cancelled):
        engine.generate(request(go_fast=True, **BOTH))
    assert len(calls) == 3
    assert_same(pristine, weights(engine))


def test_a_failed_prediction_leaves_no_lora_fused(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ordinary error after the fuse (here, in the safety checker) restores the weights too."""
    engine.loras.release()
    pristine = weights(engine)

    def broken(images: list[Image.Image]) -> list[Image.Image]:
        raise RuntimeError("checker failed")

    monkeypatch.setattr(engine.safety, "filter", broken)
    with pytest.raises(RuntimeError):
        engine.generate(request(**BOTH))
    assert_same(pristine, weights(engine))


def test_an_interrupted_save_leaves_no_half_written_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, save, calls = OutputStore(tmp_path), flux_day.outputs.save_image, []

    def interrupted(image: Image.Image, path: Path, *args: object) -> Path:
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"RIFF")  # the half-written file a cancel would leave
            raise Cancelled
        return save(image, path, *args)

    monkeypatch.setattr(flux_day.outputs, "save_image", interrupted)
    images = [Image.new("RGB", (16, 16), color) for color in ("red", "blue")]
    with pytest.raises(Cancelled):
        store.save(images, "webp", 80)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_output_names_differ_between_predictions(tmp_path: Path) -> None:
    """Cog uploads each file as upload-url + name: equal names would overwrite an earlier output."""
    store = OutputStore(tmp_path)
    image = Image.new("RGB", (16, 16), "red")
    first = [path.name for path in store.save([image, image], "png", 80)]
    second = [path.name for path in store.save([image, image], "png", 80)]
    assert len(set(first)) == 2 and not set(first) & set(second)
    assert all(name.endswith(".png") for name in first + second)
