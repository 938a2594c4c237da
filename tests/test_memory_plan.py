"""The memory plan holds every component, never plans past the card, and measures modules truly."""

from __future__ import annotations

import pytest
import torch

from flux_day.memory_plan import DEFAULT_RESERVE, format_plan, module_bytes, plan_memory

GB = 10**9
# Realistic sizes: bf16 transformers 11.9e9 params x 2 bytes, their fp8 copies 1 byte, T5-XXL 4.76e9 x 2.
SIZES = {
    "t5": int(9.52 * GB),
    "clip": int(0.25 * GB),
    "vae": int(0.17 * GB),
    "dev-bf16": int(23.8 * GB),
    "schnell-bf16": int(23.8 * GB),
    "dev-fp8": int(11.9 * GB),
    "schnell-fp8": int(11.9 * GB),
}
SHARED = ("clip", "vae", "t5")
CARDS = [24, 48, 80, 141]


@pytest.mark.parametrize("card", CARDS)
def test_every_component_is_held_and_the_gpu_is_never_overcommitted(card: int) -> None:
    plan = plan_memory(SIZES, card * GB)
    assert sorted(c.name for c in plan.components) == sorted(SIZES)
    assert plan.total("resident") + plan.swap_bytes <= card * GB - DEFAULT_RESERVE
    assert plan.peak_bytes <= card * GB
    # The swap slot takes the largest offloaded component, so any of them can be brought in.
    assert all(SIZES[n] <= plan.swap_bytes for n in plan.names("offloaded"))


@pytest.mark.parametrize("card", [48, 80, 141])
def test_encoders_and_vae_stay_resident_and_nothing_is_stranded_on_the_cpu(card: int) -> None:
    plan = plan_memory(SIZES, card * GB)
    assert all(plan[n] == "resident" for n in SHARED)
    assert plan.names("cpu-only") == ()  # both models run in both precisions


def test_80gb_keeps_the_fp8_fast_path_resident_and_swaps_the_bf16_masters() -> None:
    plan = plan_memory(SIZES, 80 * GB)
    assert plan.names("resident") == ("clip", "vae", "t5", "dev-fp8", "schnell-fp8")
    assert plan.names("offloaded") == ("dev-bf16", "schnell-bf16")
    assert plan.swap_bytes == SIZES["dev-bf16"]


def test_141gb_holds_everything_resident() -> None:
    plan = plan_memory(SIZES, 141 * GB)
    assert plan.names("offloaded") == plan.names("cpu-only") == ()
    assert plan.swap_bytes == 0


def test_48gb_keeps_bf16_runnable_rather_than_an_fp8_copy_resident() -> None:
    plan = plan_memory(SIZES, 48 * GB)
    assert plan.names("resident") == SHARED
    assert plan.swap_bytes == SIZES["dev-bf16"]


def test_24gb_swaps_t5_and_fp8_through_one_slot_and_says_bf16_cannot_run() -> None:
    # 24 GB - 10 GiB = 13.3 GB: CLIP + VAE + one fp8 transformer (12.3 GB) fits, T5 beside it does not.
    plan = plan_memory(SIZES, 24 * GB)
    assert plan.names("resident") == ("clip", "vae")
    assert plan.names("offloaded") == ("t5", "dev-fp8", "schnell-fp8")
    assert plan.names("cpu-only") == ("dev-bf16", "schnell-bf16")
    assert plan.swap_bytes == SIZES["dev-fp8"]


def test_without_fp8_copies_80gb_holds_both_bf16_transformers() -> None:
    sizes = {n: s for n, s in SIZES.items() if not n.endswith("fp8")}
    plan = plan_memory(sizes, 80 * GB)
    assert set(plan.names("resident")) == set(sizes)


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


@pytest.mark.parametrize("card", [None, *CARDS])
def test_format_plan_lists_every_component_once_and_a_totals_line(card: int | None) -> None:
    plan = plan_memory(SIZES, None if card is None else card * GB)
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
    tiny_weights, caplog: pytest.LogCaptureFixture
) -> None:
    """On this CPU machine every component is resident; with an 80 GB plan, offloaded parts take turns."""
    from flux_day.config import Settings
    from flux_day.engine import Engine
    from flux_day.residency import Residency

    with caplog.at_level("INFO", logger="flux_day.engine"):
        engine = Engine(Settings.from_env({"FLUX_DAY_WEIGHTS": str(tiny_weights), "FLUX_DAY_DEVICE": "cpu"}))
    table = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("memory plan:"))
    for name in ("clip", "t5", "vae", "safety", "dev-bf16", "schnell-bf16", "dev-fp8", "schnell-fp8"):
        assert table.count(f"\n{name} ") == 1, name
    assert set(engine.residency.plan.names("resident")) == set(engine.residency.modules)

    eighty = plan_memory({**SIZES, "safety": 1_500_000_000}, 80 * 10**9)
    residency = Residency(engine.residency.modules, eighty, torch.device("cpu"))
    residency.need(["clip", "t5"])
    assert residency.visitor is None  # resident on an 80 GB card
    residency.need(["vae", "dev-bf16"])
    residency.need(["vae", "schnell-bf16"])
    assert residency.visitor == "schnell-bf16"  # dev-bf16 went back to CPU RAM first


class Interrupted(BaseException):
    """Stands in for cog's CancelationException, raised into a move between devices."""


class Tracked(torch.nn.Linear):
    """A module that records where it is sent, and can be interrupted on its next move."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.moves: list[str] = []
        self.interrupt_next = False

    def to(self, *args: object, **kwargs: object) -> Tracked:
        self.moves.append(str(args[0] if args else kwargs["device"]))
        if self.interrupt_next:
            self.interrupt_next = False
            raise Interrupted
        return super().to(*args, **kwargs)


def test_a_move_interrupted_by_a_cancel_is_redone_by_the_next_request() -> None:
    """A cancel mid-move leaves modules half on the GPU: both go back, and the next need moves again."""
    from flux_day.residency import Residency

    eighty = plan_memory({**SIZES, "safety": 1_500_000_000}, 80 * 10**9)
    modules = {name: Tracked() for name in [*SIZES, "safety"]}
    residency = Residency(modules, eighty, torch.device("cpu"))
    residency.need(["dev-bf16"])
    dev, schnell = modules["dev-bf16"], modules["schnell-bf16"]
    dev.moves.clear()
    schnell.interrupt_next = True
    with pytest.raises(Interrupted):
        residency.need(["schnell-bf16"])
    assert residency.visitor is None
    assert dev.moves[-1] == schnell.moves[-1] == "cpu"  # both sent back
    dev.moves.clear()
    residency.need(["dev-bf16"])
    assert dev.moves == ["cpu"] and residency.visitor == "dev-bf16"  # moved again, not assumed there
