"""Input checks that need no model: types, combinations, image files and LoRA references."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from flux_day.errors import InputError, LoraError
from flux_day.generation import Generation
from flux_day.outputs import OutputStore
from flux_day.request import GenerationRequest
from flux_day.serving import declared_inputs_only
from predict import Predictor


def test_defaults_are_txt2img_dev_1024_square() -> None:
    request = GenerationRequest.from_inputs(prompt="a fox")
    assert (request.mode, request.model, request.width, request.height) == ("txt2img", "dev", 1024, 1024)
    assert (request.num_inference_steps, request.output_format, request.output_quality) == (28, "webp", 80)
    assert 0 <= request.seed < 2**32


def test_random_seeds_use_the_full_32_bit_range() -> None:
    seeds = {GenerationRequest.from_inputs(prompt="x").seed for _ in range(200)}
    assert len(seeds) == 200 and max(seeds) > 2**16


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"num_outputs": True}, r"num_outputs: True is not an integer"),
        ({"guidance_scale": float("nan")}, r"guidance_scale: nan is not a number"),
        ({"go_fast": "yes"}, r"go_fast: 'yes' is not a boolean"),
        ({"prompt": 12}, r"prompt: 12 is not text"),
        ({"replicate_weights": 5}, r"replicate_weights: 5 is not text"),
    ],
)
def test_wrong_types_are_refused_by_name(inputs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        GenerationRequest.from_inputs(**{"prompt": "x", **inputs})


def test_integral_floats_are_accepted_as_integers() -> None:
    assert GenerationRequest.from_inputs(prompt="x", num_outputs=2.0).num_outputs == 2


def test_image_sets_the_mode_and_size(tmp_path: Path) -> None:
    Image.new("RGB", (800, 600)).save(tmp_path / "image.png")
    Image.new("L", (400, 300), 255).save(tmp_path / "mask.png")
    img2img = GenerationRequest.from_inputs(prompt="x", image=tmp_path / "image.png", aspect_ratio="16:9")
    assert (img2img.mode, img2img.width, img2img.height) == ("img2img", 800, 608)
    inpaint = GenerationRequest.from_inputs(
        prompt="x", image=tmp_path / "image.png", mask=tmp_path / "mask.png"
    )
    assert inpaint.mode == "inpaint"
    assert inpaint.mask is not None and inpaint.mask.size == (800, 600)


def test_mask_of_another_shape_is_refused(tmp_path: Path) -> None:
    Image.new("RGB", (800, 600)).save(tmp_path / "image.png")
    Image.new("L", (600, 800)).save(tmp_path / "mask.png")
    with pytest.raises(InputError, match=r"mask: its size 600x800 .* image's aspect ratio"):
        GenerationRequest.from_inputs(prompt="x", image=tmp_path / "image.png", mask=tmp_path / "mask.png")


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (800, 400))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed as 400x800
    image.save(tmp_path / "rotated.jpg", exif=exif)
    request = GenerationRequest.from_inputs(prompt="x", image=tmp_path / "rotated.jpg")
    assert (request.width, request.height) == (400, 800)


def test_decompression_bombs_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100 // 2)
    with pytest.raises(InputError, match=r"image: the image has too many pixels"):
        GenerationRequest.from_inputs(prompt="x", image=tmp_path / "big.png")


@pytest.mark.parametrize("name", ["replicate_weights", "extra_lora"])
def test_a_malformed_lora_reference_is_refused_by_the_request_naming_its_input(name: str) -> None:
    with pytest.raises(LoraError, match=rf"^{name}: 'not a lora' is not a LoRA reference; give a Replicate"):
        GenerationRequest.from_inputs(prompt="x", **{name: "not a lora"})
    scale = "lora_scale" if name == "replicate_weights" else "extra_lora_scale"
    with pytest.raises(LoraError, match=rf"^{name}: '/etc/passwd' is not a LoRA reference"):  # even at 0
        GenerationRequest.from_inputs(prompt="x", **{name: "/etc/passwd", scale: 0})


def test_lora_references_are_carried_parsed_with_their_scales() -> None:
    request = GenerationRequest.from_inputs(
        prompt="x",
        replicate_weights=" fofr/flux-pixar-cars ",
        lora_scale=0.5,
        extra_lora="civitai.com/models/7",
    )
    assert [(lora.input_name, lora.ref.kind, lora.ref.shown, lora.scale) for lora in request.loras] == [
        ("replicate_weights", "replicate", "fofr/flux-pixar-cars", 0.5),
        ("extra_lora", "civitai", "civitai.com/models/7", 1.0),
    ]


def test_the_operators_default_lora_stands_in_only_when_replicate_weights_is_empty(tmp_path: Path) -> None:
    default = str(tmp_path / "trained")  # a local path: accepted from the operator, never from an input
    plain = GenerationRequest.from_inputs(prompt="x", lora_scale=0.7, extra_lora="o/extra")
    styled = plain.with_default_lora(default)
    assert [(lora.input_name, lora.ref.kind, lora.scale) for lora in styled.loras] == [
        ("COG_WEIGHTS", "local", 0.7),
        ("extra_lora", "replicate", 1.0),
    ]
    assert styled.with_default_lora(default) is styled  # never added twice
    given = GenerationRequest.from_inputs(prompt="x", replicate_weights="o/m")
    assert given.with_default_lora(default) is given
    assert plain.with_default_lora(None) is plain
    with pytest.raises(LoraError, match=r"^replicate_weights: "):
        GenerationRequest.from_inputs(prompt="x", replicate_weights=default)


class RecordingEngine:
    """Stands in for `Engine` and its `GpuScheduler`: records the requests it is asked to generate, and
    generates nothing."""

    def __init__(self, default_lora: str | None = None) -> None:
        self.default_lora = default_lora
        self.requests: list[GenerationRequest] = []

    running = 1

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        yield

    async def in_thread(self, work: Callable[..., Any], *args: object, **kwargs: object) -> Any:
        return work(*args, **kwargs)

    async def generate(self, request: GenerationRequest) -> Generation:
        self.requests.append(request)
        return Generation([], {})


def test_a_malformed_lora_reference_fails_the_prediction_before_the_engine_is_called(tmp_path: Path) -> None:
    predictor = Predictor()
    predictor.engine = predictor.scheduler = RecordingEngine(default_lora="https://example.com/trained.tar")
    predictor.outputs = OutputStore(tmp_path)
    run = declared_inputs_only(predictor.run)  # fills omitted inputs with their defaults, as setup does
    with pytest.raises(LoraError, match=r"^extra_lora: 'lora' is not a LoRA reference"):
        asyncio.run(run(prompt="a fox", extra_lora="lora"))
    assert predictor.engine.requests == []
    assert asyncio.run(run(prompt="a fox", extra_lora="o/m", extra_lora_scale=0.4)) == []
    (request,) = predictor.engine.requests
    assert [(lora.input_name, lora.ref.shown, lora.scale) for lora in request.loras] == [
        ("COG_WEIGHTS", "https://example.com/trained.tar", 1.0),
        ("extra_lora", "o/m", 0.4),
    ]


def test_a_missing_image_file_is_named_as_missing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^image: there is no such file; "):
        GenerationRequest.from_inputs(prompt="x", image=tmp_path / "none.png")
