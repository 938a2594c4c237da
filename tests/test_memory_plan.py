"""The memory plan holds every component, never plans past the card, and measures modules truly; the
simulator and the residency agree on what each request moves, and no LoRA math runs on the host."""

from __future__ import annotations

import itertools

import pytest
import torch

from flux_day.memory_plan import DEFAULT_RESERVE, format_plan, pinned_layout, plan_memory
from flux_day.residency import module_bytes
from scripts.bench.memory_model import CARDS, DEFAULT_MIX, SimRequest, simulate
from tests.harness.engines import EngineFactory

GB = 10**9
# Realistic sizes: bf16 transformers 11.9e9 params x 2 bytes, their fp8 copies 1 byte, T5-XXL 4.76e9 x 2,
# the CompVis checker's ViT-L/14 and Falconsai's ViT-base.
SIZES = {
    "t5": int(9.52 * GB),
    "clip": int(0.25 * GB),
    "vae": int(0.17 * GB),
    "safety": int(0.78 * GB),
    "dev-full": int(23.8 * GB),
    "schnell-full": int(23.8 * GB),
    "dev-fp8": int(11.9 * GB),
    "schnell-fp8": int(11.9 * GB),
}
SHARED = ("clip", "vae", "safety", "t5")
CARD = {card.split()[0]: total for card, total in CARDS.items()}  # "24", "48", "80", "141"


@pytest.mark.parametrize("card", CARD)
def test_every_component_is_held_and_the_gpu_is_never_overcommitted(card: str) -> None:
    plan = plan_memory(SIZES, CARD[card])
    assert sorted(c.name for c in plan.components) == sorted(SIZES)
    assert plan.total("resident") + plan.swap_bytes + plan.pristine_bytes <= CARD[card] - DEFAULT_RESERVE
    assert plan.peak_bytes <= CARD[card]
    # The swap slot takes the largest offloaded component, so any of them can be brought in.
    assert all(SIZES[n] <= plan.swap_bytes for n in plan.names("offloaded"))


@pytest.mark.parametrize("card", ["48", "80", "141"])
def test_encoders_and_vae_stay_resident_and_nothing_is_stranded_on_the_cpu(card: str) -> None:
    plan = plan_memory(SIZES, CARD[card])
    assert all(plan[n] == "resident" for n in SHARED)
    assert plan.names("cpu-only") == ()  # both models run in both precisions


def test_80gb_keeps_the_default_request_and_go_fast_on_dev_resident() -> None:
    plan = plan_memory(SIZES, CARD["80"])
    assert plan.names("resident") == ("clip", "vae", "safety", "t5", "dev-full", "dev-fp8")
    assert plan.names("offloaded") == ("schnell-fp8", "schnell-full")
    assert plan.swap_bytes == SIZES["schnell-full"]
    assert plan.pristine_bytes > 0  # what is left is for LoRA pristine copies, inside the plan


def test_141gb_holds_everything_resident_with_room_for_a_full_lora_on_both_masters() -> None:
    plan = plan_memory(SIZES, CARD["141"])
    assert plan.names("offloaded") == plan.names("cpu-only") == ()
    assert plan.swap_bytes == 0
    assert plan.pristine_bytes >= SIZES["dev-full"] + SIZES["schnell-full"]


def test_48gb_keeps_the_encoders_and_swaps_every_transformer() -> None:
    plan = plan_memory(SIZES, CARD["48"])
    assert plan.names("resident") == SHARED
    assert plan.swap_bytes == SIZES["dev-full"]


def test_24gb_swaps_t5_and_fp8_through_one_slot_and_says_full_precision_cannot_run() -> None:
    plan = plan_memory(SIZES, CARD["24"])
    assert plan.names("resident") == ("clip", "vae", "safety")
    assert plan.names("offloaded") == ("t5", "dev-fp8", "schnell-fp8")
    assert plan.names("cpu-only") == ("dev-full", "schnell-full")
    assert plan.swap_bytes == SIZES["dev-fp8"]


def test_without_fp8_copies_80gb_holds_both_full_precision_transformers() -> None:
    sizes = {n: s for n, s in SIZES.items() if not n.endswith("fp8")}
    plan = plan_memory(sizes, CARD["80"])
    assert set(plan.names("resident")) == set(sizes)


@pytest.mark.parametrize("card", CARD)
def test_no_lora_arithmetic_runs_on_the_host_when_a_gpu_serves(card: str) -> None:
    steps = simulate(plan_memory(SIZES, CARD[card]), DEFAULT_MIX)
    assert all(step.lora_site in {"GPU", "-"} for step in steps)
    assert all(step.denoise_site == "GPU" for step in steps if not step.refused)
    assert any(step.lora_written for step in steps if not step.refused)


@pytest.mark.parametrize("card", ["48", "80", "141"])
def test_the_default_request_never_moves_a_transformer_after_the_first(card: str) -> None:
    default = SimRequest("default")
    mix = [default, SimRequest("go_fast + LoRA", fp8=True, lora="A"), default, default, default]
    steps = simulate(plan_memory(SIZES, CARD[card]), mix)
    plan = plan_memory(SIZES, CARD[card])
    if plan["dev-full"] == "resident":
        assert all(step.moved == () for step in steps if step.request is default)
    assert steps[-1].moved == steps[-2].moved == () and steps[-1].to_gpu == 0


def test_141gb_switches_loras_without_touching_pcie_and_80gb_streams_only_what_it_must() -> None:
    switch = [SimRequest("A", fp8=True, lora="A"), SimRequest("B", fp8=True, lora="B")]
    big = simulate(plan_memory(SIZES, CARD["141"]), switch)
    assert [(s.to_gpu, s.to_host) for s in big] == [(0, 0), (0, 0)]
    eighty = simulate(plan_memory(SIZES, CARD["80"]), switch)
    # The fp8 pristine copies that miss the GPU's room go to pinned host memory once, then are read.
    assert eighty[0].to_host + eighty[0].to_gpu <= SIZES["dev-fp8"]
    assert eighty[1].to_gpu <= SIZES["dev-fp8"] and eighty[1].to_host == 0


@pytest.mark.parametrize("card", range(10, 160, 3))
def test_anything_that_fits_the_budget_alone_stays_runnable(card: int) -> None:
    plan = plan_memory(SIZES, card * GB)
    budget = card * GB - DEFAULT_RESERVE
    assert plan.total("resident") + plan.swap_bytes <= max(budget, 0)
    for c in plan.components:
        assert (c.placement == "cpu-only") == (c.bytes > budget), c


def test_a_cpu_engine_has_nothing_to_plan() -> None:
    plan = plan_memory(SIZES, None)
    assert set(plan.names("resident")) == set(SIZES)
    assert plan.swap_bytes == plan.reserve_bytes == 0
    assert "on the CPU" in format_plan(plan)


def test_unknown_components_go_last_and_missing_priorities_are_skipped() -> None:
    plan = plan_memory({"extra": 1, "vae": 2, "clip": 3}, 10 * GB, reserve_bytes=0)
    assert [c.name for c in plan.components] == ["clip", "vae", "extra"]


def test_negative_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        plan_memory({"vae": -1}, GB)


@pytest.mark.parametrize("card", [None, *CARD])
def test_format_plan_lists_every_component_once_and_a_totals_line(card: str | None) -> None:
    plan = plan_memory(SIZES, None if card is None else CARD[card])
    rows = format_plan(plan).splitlines()
    assert rows[0].split() == ["component", "GB", "placement"]
    assert [row.split() for row in rows[1:-1]] == [
        [c.name, f"{c.bytes / GB:.2f}", c.placement] for c in plan.components
    ]
    assert sorted(row.split()[0] for row in rows[1:-1]) == sorted(SIZES)
    assert rows[-1].startswith("total:")


def test_module_bytes_counts_parameters_and_buffers() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32).to(torch.bfloat16))
    linear = (64 * 32 + 32) * 4
    norm = (32 + 32) * 2 + (32 + 32) * 2 + 8  # weight, bias; running mean/var; num_batches_tracked int64
    assert module_bytes(module) == linear + norm


def test_module_bytes_counts_a_shared_weight_once() -> None:
    a, b = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
    b.weight = a.weight
    assert module_bytes(torch.nn.Sequential(a, b)) == 8 * 8 * 4


def test_module_bytes_sees_through_torchao_fp8_weights() -> None:
    quantization = pytest.importorskip("torchao.quantization")
    linear = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
    quantization.quantize_(linear, quantization.Float8WeightOnlyConfig())
    assert type(linear.weight) is not torch.nn.Parameter  # really a tensor subclass
    # fp8 data, one float32 scale per output row, the bf16 bias untouched.
    assert module_bytes(linear) == 32 * 64 * 1 + 32 * 4 + 32 * 2
    # What naive numel * element_size would say: the subclass reports the bf16 it stands in for.
    assert linear.weight.numel() * linear.weight.element_size() == 32 * 64 * 2


def test_the_engine_logs_one_plan_table_and_keeps_one_visitor_on_the_gpu(
    make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """On this CPU machine every component is resident; with an 80 GB plan, offloaded parts take turns."""
    from flux_day.residency import Residency

    with caplog.at_level("INFO", logger="flux_day.engine"):
        engine = make_engine()
    table = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("memory plan:"))
    for name in ("clip", "t5", "vae", "safety", "dev-full", "schnell-full", "dev-fp8", "schnell-fp8"):
        assert table.count(f"\n{name} ") == 1, name
    assert set(engine.residency.plan.names("resident")) == set(SIZES)

    eighty = plan_memory(SIZES, CARD["80"])
    modules = {name: module for name, module in engine.residency.modules.items() if name in SIZES}
    residency = Residency(modules, eighty, torch.device("cpu"))
    residency.need(["clip", "t5"])
    assert residency.visitor is None  # resident on an 80 GB card
    residency.need(["vae", "dev-full"])
    assert residency.visitor is None
    residency.need(["vae", "schnell-full"])
    assert residency.visitor == "schnell-full"


def small_modules() -> dict[str, torch.nn.Module]:
    """One small module per planned component (the residency moves tensors, whatever their size)."""
    torch.manual_seed(0)
    return {name: torch.nn.Linear(4, 4) for name in SIZES}


def test_the_residency_moves_what_the_simulator_says() -> None:
    from flux_day.residency import Residency

    for card in CARD:
        plan = plan_memory(SIZES, CARD[card])
        modules = small_modules()
        built = {name: modules.pop(name) for name in list(modules) if name.endswith("fp8")}
        residency = Residency(modules, plan, torch.device("cpu"))
        expected = simulate(plan, DEFAULT_MIX)
        for step in expected:
            if step.refused:
                continue
            request, moved = step.request, []
            transformer = f"{request.model}-{'fp8' if request.fp8 else 'full'}"
            for name in ("clip", "t5", "vae", transformer, "safety"):
                before = residency.visitor
                if name not in residency.modules:  # an fp8 copy, made on first need
                    residency.add(name, lambda device, module=built[name]: module)
                residency.need([name])
                if residency.visitor != before and residency.visitor == name:
                    moved.append(name)
            assert tuple(moved) == step.moved, (card, request.label)


class Interrupted(BaseException):
    """Stands in for cog's CancelationException, raised into a move between devices."""


def test_a_move_interrupted_by_a_cancel_is_undone_and_redone_by_the_next_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cancel mid-move leaves a module half on the GPU: it is sent home whole, its LoRA state
    forgotten, and the next need brings it again from its untouched home copy."""
    from flux_day import residency as residency_module
    from flux_day.residency import Residency, set_storage

    plan = plan_memory(SIZES, CARD["80"])
    modules = small_modules()
    left: list[str] = []
    residency = Residency(modules, plan, torch.device("cpu"), on_leave=left.append)
    schnell = modules["schnell-full"]
    home = {id(t): residency.home(t) for t in schnell.parameters()}
    assert all(copy is not None for copy in home.values())
    with torch.no_grad():
        residency.need(["schnell-full"])
        schnell.weight.add_(1.0)  # a LoRA fused into the visitor's device copy
    residency.need(["schnell-fp8"])  # schnell-full goes home: its device copy (and LoRA) dropped
    assert left == ["schnell-full"]
    assert all(t.data_ptr() == home[id(t)].data_ptr() for t in schnell.parameters())
    real = residency_module.Residency._bring
    calls = []

    def interrupted(self: Residency, name: str) -> None:
        calls.append(name)
        first = next(iter(self.modules[name].parameters()))
        set_storage(first, self.home(first).to("cpu", copy=True))  # half moved
        raise Interrupted

    monkeypatch.setattr(residency_module.Residency, "_bring", interrupted)
    with pytest.raises(Interrupted):
        residency.need(["schnell-full"])
    assert residency.visitor is None and left[-1] == "schnell-full"
    assert all(t.data_ptr() == home[id(t)].data_ptr() for t in schnell.parameters())  # all home
    monkeypatch.setattr(residency_module.Residency, "_bring", real)
    residency.need(["schnell-full"])
    assert residency.visitor == "schnell-full"
    assert all(t.data_ptr() != home[id(t)].data_ptr() for t in schnell.parameters())  # moved again
    assert torch.equal(schnell.weight, home[id(schnell.weight)])  # pristine: no LoRA came back


def flux_dev_tensor_sizes() -> dict[str, list[int]]:
    """Bytes of every tensor of FLUX.1 dev's real transformer (built on the meta device: nothing is
    allocated), in bf16 and as its fp8 copy holds them (1 byte per linear weight element plus a float32
    scale per row, in their own tensors)."""
    from diffusers import FluxTransformer2DModel

    from scripts.random_weights.models import PROFILES, transformer_config

    with torch.device("meta"):
        model = FluxTransformer2DModel(**transformer_config(PROFILES["full"], True)).to(torch.bfloat16)
    bf16 = [t.numel() * t.element_size() for t in model.parameters()]
    fp8: list[int] = []
    for module in model.modules():
        for key, t in module.named_parameters(recurse=False):
            linear_weight = isinstance(module, torch.nn.Linear) and key == "weight"
            fp8 += [t.numel(), t.shape[0] * 4] if linear_weight else [t.numel() * t.element_size()]
    return {"bf16": bf16, "fp8": fp8}


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_pinned_chunks_of_flux_take_within_two_percent_of_its_bytes(precision: str) -> None:
    sizes = flux_dev_tensor_sizes()[precision]
    assert sum(sizes) == pytest.approx(23.8e9 if precision == "bf16" else 11.92e9, rel=0.01)
    layout = pinned_layout(sizes)
    # Pinned tensor by tensor, the allocator's power-of-two rounding costs about half as much again.
    assert sum(1 << (size - 1).bit_length() for size in sizes) > 1.5 * sum(sizes)
    assert sum(sizes) <= layout.pinned_bytes <= 1.02 * sum(sizes)
    assert all(chunk & (chunk - 1) == 0 for chunk in layout.chunks)  # nothing left for the allocator to round


@pytest.mark.parametrize(
    "sizes",
    [
        [3, 1000, 7, 512, 513, 1],  # smaller than a chunk, odd sizes
        [5000, 300, 4096, 0, 2048, 2049],  # one larger than a chunk (4096), and an empty tensor
        [1024] * 9,  # exactly full chunks
    ],
)
def test_pinned_tensors_are_aligned_inside_their_chunk_and_never_overlap(sizes: list[int]) -> None:
    layout = pinned_layout(sizes, chunk_bytes=4096, align=64)
    spans: dict[int, list[tuple[int, int]]] = {}
    for size, (chunk, offset) in zip(sizes, layout.places, strict=True):
        assert offset % 64 == 0 and offset + size <= layout.chunks[chunk]
        spans.setdefault(chunk, []).append((offset, offset + size))
    for chunk_spans in spans.values():
        chunk_spans.sort()
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(chunk_spans))
    assert sum(sizes) <= layout.pinned_bytes < sum(sizes) + len(sizes) * 64 + 4096


def test_pinned_layout_refuses_chunks_that_are_not_powers_of_two() -> None:
    with pytest.raises(ValueError, match="powers of two"):
        pinned_layout([10], chunk_bytes=3000)
