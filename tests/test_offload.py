"""Offloaded modules: moves that carry a tensor subclass's inner tensors, home copies packed into
power-of-two chunks that are never written, and the 80 GB layout on the tiny weights under both fp8
recipes (schnell's two transformers swap through one slot, each sent home with LoRAs fused into it),
where every image equals the same request's on an engine that keeps everything resident."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from flux_day.engine import Engine
from flux_day.fp8 import quantized_weight
from flux_day.memory_plan import GpuBudget, plan_memory
from flux_day.pipelines import component_sizes
from flux_day.request import GenerationRequest
from flux_day.residency import PinnedArena, Residency, inner_tensors, module_bytes, set_storage
from scripts.bench.memory_model import card_offloading_schnell
from tests.harness import lora_files as lf
from tests.harness.engines import RECIPES, EngineFactory


def fp8_linear(recipe: str, seed: int = 0) -> nn.Linear:
    """A linear layer whose weight is a torchao fp8 tensor subclass (inner tensors `qdata`, `scale`)."""
    torch.manual_seed(seed)
    linear = nn.Linear(64, 32, dtype=RECIPES[recipe].dtype)
    linear.weight = nn.Parameter(
        quantized_weight(linear.weight.detach(), RECIPES[recipe].fp8), requires_grad=False
    )
    return linear


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every plain tensor that holds `module`'s storage (a subclass's inner tensors), copied."""
    return {
        f"{name}.{part}": inner.clone()
        for name, tensor in module.named_parameters()
        for part, inner in inner_tensors(tensor).items()
    }


def aligned(tensor: torch.Tensor, align: int = 512) -> bool:
    """Whether `tensor` starts `align`-aligned inside its chunk (chunks themselves start where the
    allocator puts them: page-aligned when pinned, 64-byte aligned in ordinary host memory)."""
    return (tensor.data_ptr() - tensor.untyped_storage().data_ptr()) % align == 0


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def test_set_storage_moves_an_fp8_weight_with_its_inner_tensors_and_keeps_the_parameter(recipe: str) -> None:
    linear = fp8_linear(recipe)
    weight = linear.weight
    assert set(inner_tensors(weight)) == {"qdata", "scale"}
    moved = PinnedArena(pin=False).copies([weight])[0]
    set_storage(weight, moved)
    assert linear.weight is weight and isinstance(weight, nn.Parameter)  # the fuser's slots still hold it
    now, there = inner_tensors(weight), inner_tensors(moved)
    assert all(now[part].data_ptr() == there[part].data_ptr() for part in now)


def test_arena_copies_are_aligned_views_with_identical_bytes(recipe: str) -> None:
    plain = [
        torch.randn(7, 5),
        torch.randn(3, dtype=torch.bfloat16),
        torch.randn(4, 6).t(),
        torch.tensor(2.5),
    ]
    tensors = [*plain, torch.empty(0), fp8_linear(recipe).weight]
    arena = PinnedArena(pin=False, chunk_bytes=4096, align=512)
    copies = arena.copies(tensors)
    for tensor, copy in zip(tensors, copies, strict=True):
        assert type(copy) is type(tensor.detach()) and copy.shape == tensor.shape
        originals, copied = inner_tensors(tensor.detach()), inner_tensors(copy)
        for part, leaf in copied.items():
            assert (aligned(leaf) or leaf.numel() == 0) and same_bytes(
                leaf.contiguous(), originals[part].contiguous()
            )
    leaves = [leaf for tensor in tensors for leaf in inner_tensors(tensor).values()]
    assert arena.tensor_bytes == sum(leaf.numel() * leaf.element_size() for leaf in leaves)
    # Five small tensors take 512 bytes each (aligned), qdata 2048: a full chunk and one of 512.
    assert arena.pinned_bytes == 4096 + 512


def test_arena_copies_made_one_at_a_time_share_chunks_and_a_larger_tensor_gets_its_own() -> None:
    arena = PinnedArena(pin=False, chunk_bytes=4096, align=512)
    small = [arena.copy(torch.full((100,), float(i))) for i in range(8)]  # 400 bytes each, 512 aligned
    assert arena.pinned_bytes == 4096 and all(aligned(t) for t in small)
    assert all(torch.equal(t, torch.full((100,), float(i))) for i, t in enumerate(small))
    big = torch.arange(1500, dtype=torch.float32)  # 6000 bytes: a chunk of 8192 of its own
    assert torch.equal(arena.copy(big), big) and arena.pinned_bytes == 4096 + 8192
    arena.copy(torch.ones(400))  # 1600 bytes: the big tensor's chunk still has room
    assert arena.pinned_bytes == 4096 + 8192


def test_a_module_sent_home_holds_its_home_copy_which_no_visit_writes(recipe: str) -> None:
    """Two modules that take turns in one slot (a CPU run of a GPU plan): the visitor's copy is written
    (as a LoRA fuse does), sent home, and brought back with the home copy's bytes."""
    modules = {"a": fp8_linear(recipe, seed=1), "b": fp8_linear(recipe, seed=2)}
    plan = plan_memory({"a": 100, "b": 100}, device_bytes=150, reserve_bytes=0)
    assert plan.names("offloaded") == ("a", "b")
    residency = Residency(modules, plan, torch.device("cpu"))
    assert residency.host.tensor_bytes == sum(module_bytes(module) for module in modules.values())
    original = snapshot(modules["a"])
    residency.need(["a"])
    for inner in inner_tensors(modules["a"].weight).values():
        inner.zero_()  # what a fuse writes into the visiting copy
    residency.need(["b"])  # "a" goes home
    for tensor in modules["a"].parameters():
        held, home = inner_tensors(tensor), inner_tensors(residency.home(tensor))
        assert all(held[part].data_ptr() == home[part].data_ptr() for part in held)
    residency.need(["a"])
    now = snapshot(modules["a"])
    assert all(same_bytes(now[key], original[key]) for key in original)
    home = inner_tensors(residency.home(modules["a"].weight))
    assert all(
        inner.data_ptr() != home[part].data_ptr()
        for part, inner in inner_tensors(modules["a"].weight).items()
    )


# The safety models are resident on this card and not what is tested here: off, to keep the test fast.
SMALL = {
    "prompt": "a fox",
    "num_inference_steps": 2,
    "megapixels": "0.25",
    "seed": 3,
    "disable_safety_checker": True,
}
LORA_A = lf.data_uri(lf.to_bytes(lf.kohya(lf.random_lora(6))))
LORA_B = lf.data_uri(lf.to_bytes(lf.kohya(lf.random_lora(7))))
LORAS = {
    "none": {},
    "A": {"replicate_weights": LORA_A},
    "B": {"replicate_weights": LORA_B},
    "A+B": {"replicate_weights": LORA_A, "extra_lora": LORA_B, "extra_lora_scale": 0.7},
}
# (model, go_fast, LoRAs): the whole matrix once per model. Each fused schnell copy is sent home by the
# next schnell request (the other precision takes the slot) while its LoRA is still fused; the first
# three requests are the sequence that once leaked LoRA A into the third user's image. dev is resident
# on this card: its requests run between schnell's, with their own LoRAs fused.
ORDER = (
    ("schnell", True, "A"),
    ("schnell", False, "none"),
    ("schnell", True, "none"),
    ("dev", True, "A"),
    ("schnell", False, "B"),
    ("schnell", True, "A+B"),
    ("dev", False, "B"),
    ("schnell", False, "A"),
    ("schnell", True, "B"),
    ("dev", True, "A+B"),
    ("schnell", False, "A+B"),
    ("dev", False, "none"),
    ("schnell", True, "none"),
    ("dev", True, "B"),
    ("dev", False, "A+B"),
    ("dev", True, "none"),
    ("dev", False, "A"),
)


def test_the_order_covers_the_matrix_and_sends_every_fused_schnell_copy_home() -> None:
    assert sorted(set(ORDER)) == sorted(
        {(m, f, lo) for m in ("dev", "schnell") for f in (0, 1) for lo in LORAS}
    )
    schnell = [(fast, lora) for model, fast, lora in ORDER if model == "schnell"]
    sent_home_fused = {
        pair for pair, after in itertools.pairwise(schnell) if pair[1] != "none" and after[0] != pair[0]
    }
    assert sent_home_fused == {(fast, lora) for fast in (True, False) for lora in ("A", "B", "A+B")}


def image(engine: Engine, model: str, go_fast: bool, loras: str) -> np.ndarray:
    request = GenerationRequest.from_inputs(**SMALL, model=model, go_fast=go_fast, **LORAS[loras])
    return np.asarray(engine.generate(request).images[0])


def assert_offloaded_modules_hold_only_their_home_copies(engine: Engine) -> int:
    """Every built offloaded module but the visitor sits in its home copy: each inner tensor of a tensor
    subclass (fp8 `qdata`, `scale`), not just its wrapper, is the home copy's storage. Returns how many
    tensor subclasses were checked."""
    subclasses = 0
    for name in engine.plan.names("offloaded"):
        if name == engine.residency.visitor or name not in engine.residency.modules:
            continue
        for tensor in engine.residency.modules[name].parameters():
            home = engine.residency.home(tensor)
            assert home is not None, name
            held, homes = inner_tensors(tensor), inner_tensors(home)
            assert held.keys() == homes.keys(), name
            assert all(held[part].data_ptr() == homes[part].data_ptr() for part in held), name
            subclasses += type(tensor) is not torch.nn.Parameter and type(tensor) is not torch.Tensor
    return subclasses


def test_the_80gb_layout_serves_every_lora_combination_as_a_resident_engine_does(
    make_engine: EngineFactory, recipe: str
) -> None:
    resident = make_engine(FLUX_DAY_FP8_CACHE="0", recipe=recipe)
    card = GpuBudget(card_offloading_schnell(component_sizes(resident.models, resident.safety)), 0)
    offloading = make_engine(FLUX_DAY_FP8_CACHE="0", recipe=recipe, budget=card)
    assert offloading.plan.names("offloaded") == ("schnell-fp8", "schnell-full")
    fp8_checked = 0
    expected: dict[tuple[str, bool, str], np.ndarray] = {}
    for step, (model, go_fast, loras) in enumerate(ORDER):
        served = image(offloading, model, go_fast, loras)
        if (model, go_fast, loras) not in expected:
            expected[model, go_fast, loras] = image(resident, model, go_fast, loras)
        assert np.array_equal(served, expected[model, go_fast, loras]), (
            f"request {step}: {model} go_fast={go_fast} LoRAs {loras}"
        )
        fp8_checked += assert_offloaded_modules_hold_only_their_home_copies(offloading)
    assert fp8_checked > 0  # the fp8 copy was checked at home, inner tensors and all
