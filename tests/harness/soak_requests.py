"""The soak's request mix: what `scripts/soak.py` sends, in what order, and what each request must do.

Kept apart from the driver and the report so that the mix (kinds and their shares, LoRA switches, bad
inputs, cancels, probes, the warm-up) reads as one piece, and the same seed always draws the same
requests, whoever draws them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from tests.harness.cog_server import data_uri
from tests.harness.http_files import HttpFiles
from tests.harness.image_files import gradient, png_bytes
from tests.harness.lora_files import bfl, kohya, random_lora, to_bytes
from tests.harness.lora_files import data_uri as lora_data_uri

TABLE_SIZES = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")
SMALL = {"megapixels": "0.25", "num_inference_steps": 4}
# Slow enough on tiny weights (about 3 s on 2 cores) that a cancel sent within a second lands mid-run.
SLOW = {"aspect_ratio": "custom", "width": 1024, "height": 1024, "num_inference_steps": 24}
# A cancelled request runs the most steps the schema allows: the cancel (sent after at most 0.9 s)
# still lands mid-run on a machine several times faster than 2 cores, and costs nothing here.
CANCELLED = {**SLOW, "num_inference_steps": 50}
PROBES: dict[str, dict[str, Any]] = {  # fixed requests: the same bytes every time, whatever came before
    "probe-none": {"prompt": "a fox", "model": "dev", "seed": 7, "output_format": "png", **SMALL},
    "probe-ab-fast": {
        "prompt": "a fox",
        "model": "schnell",
        "go_fast": True,
        "seed": 8,
        "output_format": "png",
        **SMALL,
    },
}
WARM_UP_MIX = 150  # requests of a warm-up mix before the baseline (fewer for shorter runs)
SHARES = {"cancel": 0.08, "bad": 0.16, "probe": 0.06}  # the rest: txt2img, img2img, inpaint, custom


@dataclass(frozen=True)
class Loras:
    """The LoRA references a soak uses: A inline as a data: URI, B and the bad ones as URLs."""

    a: str
    b: str
    bad: dict[str, str]  # name -> reference the predictor cannot read


@dataclass(frozen=True)
class Planned:
    """One request of the mix: what to send and what must come back."""

    kind: str
    inputs: dict[str, Any]
    expect: str  # succeeded | failed | canceled
    names: str | None = None  # the input a failure must name
    cancel_after_s: float | None = None


# The last request of the warm-up and of a run: both leave the same files in the output folder.
CLOSING = Planned("probe-none", PROBES["probe-none"], "succeeded")


# ---------------------------------------------------------------------------------------------- inputs


def png(image: Image.Image) -> str:
    """`image` as a PNG data: URI, the way a client sends an upload inline."""
    return data_uri(png_bytes(image))


def half_mask(width: int, height: int) -> Image.Image:
    """A mask that repaints the left half (white) and keeps the right."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, : width // 2] = 255
    return Image.fromarray(mask, "L")


@dataclass(frozen=True)
class Images:
    """Inputs as data: URIs, made once: small ones for normal requests, a large one for slow img2img."""

    small: tuple[tuple[str, str], ...]  # (image, mask) pairs
    large: str

    @classmethod
    def make(cls) -> Images:
        sizes = ((192, 128), (128, 192), (160, 160))
        return cls(
            tuple((png(gradient(w, h)), png(half_mask(w, h))) for w, h in sizes), png(gradient(1024, 1024))
        )


def serve_loras(files: HttpFiles) -> Loras:
    """Two distinct working LoRAs (kohya and BFL layouts) and three the predictor must refuse."""
    return Loras(
        a=lora_data_uri(to_bytes(kohya(random_lora(101)))),
        b=files.serve("/soak-b.safetensors", to_bytes(bfl(random_lora(102)))),
        bad={
            "garbage-data-uri": lora_data_uri(random.Random(0).randbytes(4000)),
            "garbage-url": files.serve("/soak-garbage.safetensors", random.Random(1).randbytes(4000)),
            "missing-url": files.error("/soak-missing.safetensors", 404),
        },
    )


# ------------------------------------------------------------------------------------------------ plan


def lora_inputs(rng: random.Random, loras: Loras) -> dict[str, Any]:
    """None, A, B or A+B, at varied scales, with A and B in either slot."""
    first, second = (loras.a, loras.b) if rng.random() < 0.5 else (loras.b, loras.a)
    choice = rng.choice(("none", "main", "extra", "both"))
    inputs: dict[str, Any] = {}
    if choice in ("main", "both"):
        inputs |= {"replicate_weights": first, "lora_scale": round(rng.uniform(0.3, 1.2), 2)}
    if choice in ("extra", "both"):
        inputs |= {"extra_lora": second, "extra_lora_scale": round(rng.uniform(0.3, 1.2), 2)}
    return inputs


def good_request(rng: random.Random, loras: Loras, images: Images) -> Planned:
    """A request that must succeed: txt2img, img2img, inpaint or a small custom size."""
    kind = rng.choices(("txt2img", "img2img", "inpaint", "custom"), weights=(5, 2, 2, 1))[0]
    inputs: dict[str, Any] = {
        "prompt": rng.choice(("a fox", "a red city at night", "a bowl of soup")),
        "model": rng.choice(("dev", "schnell")),
        "go_fast": rng.random() < 0.5,
        "seed": rng.randrange(2**32),
        "num_outputs": rng.choice((1, 1, 2)),
        "output_format": rng.choice(("webp", "jpg", "png")),
        "aspect_ratio": rng.choice(TABLE_SIZES),
        **SMALL,
        **lora_inputs(rng, loras),
    }
    image, mask = rng.choice(images.small)
    if kind == "img2img":
        inputs |= {"image": image, "prompt_strength": round(rng.uniform(0.5, 0.95), 2)}
    elif kind == "inpaint":
        inputs |= {"image": image, "mask": mask}
    elif kind == "custom":
        inputs |= {
            "aspect_ratio": "custom",
            "width": rng.choice((256, 300)),
            "height": rng.choice((256, 320)),
        }
    return Planned(kind, inputs, "succeeded")


def bad_request(rng: random.Random, loras: Loras, images: Images, variant: str) -> Planned:
    """A request that must fail with an error naming `names`, leaving the server as it was."""
    inputs = {"prompt": "a fox", "seed": rng.randrange(2**32), **SMALL, **lora_inputs(rng, loras)}
    mask = images.small[0][1]
    if variant in loras.bad:
        slot = rng.choice(("replicate_weights", "extra_lora"))
        return Planned(f"bad-lora:{variant}", inputs | {slot: loras.bad[variant]}, "failed", slot)
    change, names = {
        "num_outputs": ({"num_outputs": 5}, "num_outputs"),
        "aspect_ratio": ({"aspect_ratio": "7:3"}, "aspect_ratio"),
        "mask-without-image": ({"mask": mask}, "mask"),
        "image-not-an-image": ({"image": data_uri(b"not an image")}, "image"),
        "custom-without-height": ({"aspect_ratio": "custom", "width": 512}, "height"),
    }[variant]
    return Planned(f"bad-input:{variant}", inputs | change, "failed", names)


BAD_INPUT_VARIANTS = (
    "num_outputs",
    "aspect_ratio",
    "mask-without-image",
    "image-not-an-image",
    "custom-without-height",
)


def cancel_request(rng: random.Random, loras: Loras, images: Images) -> Planned:
    """A slow request (1024x1024 txt2img, or img2img of a 1024x1024 image) cancelled after 0.3-0.9 s."""
    inputs = {"prompt": "a slow fox", "seed": rng.randrange(2**32), **CANCELLED, **lora_inputs(rng, loras)}
    if rng.random() < 0.5:
        inputs |= {"image": images.large, "prompt_strength": 1.0}
    return Planned("cancel", inputs, "canceled", cancel_after_s=round(rng.uniform(0.3, 0.9), 2))


def plan(count: int, seed: int | str, loras: Loras, images: Images) -> list[Planned]:
    """`count` requests in a mix fixed by `seed`; every kind of outcome occurs even in a short run."""
    rng = random.Random(seed)
    cancels = max(1, round(count * SHARES["cancel"]))
    bads = max(2, round(count * SHARES["bad"]))
    probes = max(1, round(count * SHARES["probe"]))
    # A bad LoRA and a mask without image first: the predictor itself refuses those (a server with the
    # OpenAPI schema answers 422 to some others), so even a short run sees a "failed"; then all in turn.
    variants = [*loras.bad, *BAD_INPUT_VARIANTS]
    order = ["garbage-data-uri", "mask-without-image"]
    while len(order) < bads:
        order += rng.sample(variants, len(variants))
    requests = [cancel_request(rng, loras, images) for _ in range(cancels)]
    requests += [bad_request(rng, loras, images, variant) for variant in order[:bads]]
    requests += [
        Planned(name, PROBES[name] | probe_loras(name, loras), "succeeded")
        for name in (rng.choice(list(PROBES)) for _ in range(probes))
    ]
    requests += [good_request(rng, loras, images) for _ in range(max(0, count - len(requests)))]
    rng.shuffle(requests)
    return requests[:count]


def probe_loras(name: str, loras: Loras) -> dict[str, Any]:
    """The LoRA inputs of a probe: A+B for `probe-ab-fast`, none for `probe-none`."""
    if name == "probe-ab-fast":
        return {
            "replicate_weights": loras.a,
            "lora_scale": 0.8,
            "extra_lora": loras.b,
            "extra_lora_scale": 0.6,
        }
    return {}


def warm_up(loras: Loras, images: Images, count: int, seed: int) -> list[Planned]:
    """The largest requests of the mix run to the end, then a mix of its own (every path: lazy imports,
    first-use buffers), so the baseline has the allocator past its high-water mark (see the docstring
    of `scripts/soak.py`). It ends with the request that ends the run, so the output folder holds the
    same files at both ends."""
    both = probe_loras("probe-ab-fast", loras)
    return [
        Planned("slow-txt2img", {"prompt": "a fox", "seed": 1, **SLOW, **both}, "succeeded"),
        Planned("slow-img2img", {"prompt": "a fox", "seed": 1, "image": images.large, **SLOW}, "succeeded"),
        *plan(min(WARM_UP_MIX, count), f"warm-up {seed}", loras, images),
        CLOSING,
    ]
