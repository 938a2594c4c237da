"""Size rules as pure functions: table, megapixels, custom rounding, sizes that follow an image."""

from __future__ import annotations

import pytest

from flux_day.sizes import (
    ASPECT_RATIOS,
    MAX_IMAGE_SIDE,
    aspect_ratio_size,
    custom_size,
    image_size,
    round_to_step,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1000, 1008), (999, 992), (1007, 1008), (1008, 1008), (1016, 1024), (256, 256), (263, 256), (264, 272)],
)
def test_round_to_nearest_multiple_of_16(value: int, expected: int) -> None:
    assert round_to_step(value) == expected


def test_table_sides_are_multiples_of_16_and_about_one_megapixel() -> None:
    for name in ASPECT_RATIOS:
        for megapixels, target in (("1", 1024 * 1024), ("0.25", 512 * 512)):
            width, height = aspect_ratio_size(name, megapixels)
            assert width % 16 == 0 and height % 16 == 0
            assert abs(width * height / target - 1) < 0.08, (name, megapixels)
            numerator, denominator = map(int, name.split(":"))
            assert abs((width / height) / (numerator / denominator) - 1) < 0.1, name


def test_quarter_megapixel_halves_each_side() -> None:
    for name, (width, height) in ASPECT_RATIOS.items():
        assert aspect_ratio_size(name, "0.25") == (width // 2, height // 2)


def test_custom_size_rounds_each_side() -> None:
    assert custom_size(999, 1010) == (992, 1008)


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (4000, 3000),
        (3000, 4000),
        (1441, 1441),
        (5000, 17),
        (1440, 1440),
        (1000, 700),
        (50, 30),
        (8, 8),
        (17, 999),
    ],
)
def test_image_size_rules(width: int, height: int) -> None:
    out_w, out_h = image_size(width, height)
    assert out_w % 16 == 0 and out_h % 16 == 0
    assert 16 <= out_w <= MAX_IMAGE_SIDE and 16 <= out_h <= MAX_IMAGE_SIDE
    scale = min(1.0, MAX_IMAGE_SIDE / max(width, height))
    # Never upscaled: each side within rounding (8 px, or the 16 px floor) of the scaled side.
    for side, original in ((out_w, width), (out_h, height)):
        assert side <= max(16, original * scale + 8)
        assert side >= min(MAX_IMAGE_SIDE, original * scale) - 8
