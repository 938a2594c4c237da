"""LyCORIS LoKr and LoHa stay factored until the fuse, which expands them row block by row block: the
fused weight equals pristine + scale · the dense update computed independently (`torch.kron`, the
Hadamard product of the two products) in float32, rounded once, to the bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flux_day.errors import LoraError
from flux_day.loras import delta_math
from flux_day.loras.delta_math import ScaledDelta
from flux_day.loras.fuse import UnrepresentableWeight, WeightFuser
from flux_day.loras.lycoris import Hadamard, Kronecker, lycoris_delta

ROWS, COLUMNS = 48, 40  # LoKr: w1 4x4 and w2 12x10


def lycoris_file(kind: str, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
    """(a module's LyCORIS tensors, their dense update computed independently, alpha/rank)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    if kind == "lokr-whole":  # both factors stored whole: no alpha scaling
        w1, w2 = r(4, 4), r(ROWS // 4, COLUMNS // 4)
        return {"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(3.0)}, torch.kron(w1, w2), 1.0
    if kind == "lokr-low-rank":  # both factors low-rank: alpha / rank(w2_b)
        w1_a, w1_b, w2_a, w2_b = r(4, 2), r(2, 4), r(ROWS // 4, 3), r(3, COLUMNS // 4)
        roles = {"lokr_w1_a": w1_a, "lokr_w1_b": w1_b, "lokr_w2_a": w2_a, "lokr_w2_b": w2_b}
        return roles | {"alpha": torch.tensor(2.0)}, torch.kron(w1_a @ w1_b, w2_a @ w2_b), 2.0 / 3
    a1, b1, a2, b2 = r(ROWS, 2), r(2, COLUMNS), r(ROWS, 2), r(2, COLUMNS)
    roles = {"hada_w1_a": a1, "hada_w1_b": b1, "hada_w2_a": a2, "hada_w2_b": b2, "alpha": torch.tensor(4.0)}
    return roles, (a1 @ b1) * (a2 @ b2), 4.0 / 2


KINDS = ("lokr-whole", "lokr-low-rank", "loha")


def expected_weight(pristine: torch.Tensor, *updates: torch.Tensor) -> torch.Tensor:
    """`pristine + Σ updates` in float32, rounded once to `pristine`'s dtype."""
    total = pristine.float()
    for update in updates:
        total = total + update
    return total.to(pristine.dtype)


@pytest.mark.parametrize("chunk_rows", [delta_math.CHUNK_ROWS, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_a_lycoris_update_fuses_to_its_independent_dense_math_bit_exactly(
    kind: str, dtype: torch.dtype, chunk_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole, and in blocks of 16 rows (a multiple of 8, as CHUNK_ROWS is: BLAS computes each row of
    a LoHa product alike in such a block and in the whole matrix)."""
    monkeypatch.setattr(delta_math, "CHUNK_ROWS", chunk_rows)
    roles, dense, alpha_scale = lycoris_file(kind, seed=1)
    delta = lycoris_delta("m", roles)
    assert isinstance(delta, Hadamard if kind == "loha" else Kronecker) and delta.scale == alpha_scale
    linear = nn.Linear(COLUMNS, ROWS).to(dtype)
    pristine = linear.weight.detach().clone()
    fuser = WeightFuser()
    fuser.apply({linear.weight: [ScaledDelta("a", delta, 0.8)]})
    assert torch.equal(linear.weight.detach(), expected_weight(pristine, (0.8 * alpha_scale) * dense))
    fuser.apply({})
    assert torch.equal(linear.weight.detach(), pristine)


@pytest.mark.parametrize("kind", KINDS)
def test_a_modules_rows_split_over_linears_and_rotated_are_those_rows_of_the_dense_update(kind: str) -> None:
    """A BFL module's rows go to several diffusers linears (qkv), or come with their halves swapped
    (the final modulation): each part fuses to its rows of the independent dense update."""
    roles, dense, alpha_scale = lycoris_file(kind, seed=2)
    delta = lycoris_delta("m", roles)
    parts = {
        "q": (delta.rows_from(0, 16), dense[0:16]),
        "v": (delta.rows_from(32, 16), dense[32:48]),
        "swapped": (delta.rows_from(ROWS // 2, ROWS), torch.cat([dense[ROWS // 2 :], dense[: ROWS // 2]])),
    }
    for name, (part, rows) in parts.items():
        linear = nn.Linear(COLUMNS, rows.shape[0])
        pristine = linear.weight.detach().clone()
        WeightFuser().apply({linear.weight: [ScaledDelta("a", part, 1.5)]})
        assert part.shape == tuple(rows.shape)
        assert torch.equal(linear.weight.detach(), pristine + (1.5 * alpha_scale) * rows), name


def test_lycoris_updates_of_two_loras_sum_in_one_order_whichever_input_names_them() -> None:
    (lokr, lokr_dense, lokr_scale), (loha, loha_dense, loha_scale) = (
        lycoris_file("lokr-low-rank", seed=3),
        lycoris_file("loha", seed=4),
    )
    linear = nn.Linear(COLUMNS, ROWS).to(torch.bfloat16)
    pristine = linear.weight.detach().clone()
    fuser = WeightFuser()
    a, b = ScaledDelta("a", lycoris_delta("a", lokr), 0.5), ScaledDelta("b", lycoris_delta("b", loha), 1.2)
    fuser.apply({linear.weight: [b, a]})
    expected = expected_weight(pristine, (0.5 * lokr_scale) * lokr_dense, (1.2 * loha_scale) * loha_dense)
    assert torch.equal(linear.weight.detach(), expected)
    fuser.apply({linear.weight: [a, b]})  # same content: nothing written, same bytes
    assert torch.equal(linear.weight.detach(), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_a_lycoris_update_past_the_dtypes_range_is_refused_and_restored(kind: str) -> None:
    roles, _, _ = lycoris_file(kind, seed=5)
    delta = lycoris_delta("m", roles)
    linear = nn.Linear(COLUMNS, ROWS).to(torch.float16)
    pristine = linear.weight.detach().clone()
    with pytest.raises(UnrepresentableWeight):
        WeightFuser().apply({linear.weight: [ScaledDelta("a", delta, 1e6)]})
    assert torch.equal(linear.weight.detach(), pristine)


@pytest.mark.parametrize(
    "roles",
    [
        {"lokr_w1": torch.ones(2, 2), "lokr_w2_a": torch.ones(4, 2), "lokr_w2_b": torch.ones(3, 4)},
        {"lokr_w1": torch.ones(2, 2)},
        {"lokr_w1": torch.ones(2), "lokr_w2": torch.ones(2, 2)},
        {
            f"hada_w{i}_{p}": torch.ones(4, 2) if p == "a" else torch.ones(2, 5 + i)
            for i in (1, 2)
            for p in "ab"
        },
    ],
    ids=["ranks-differ", "w2-missing", "not-a-matrix", "products-differ"],
)
def test_lycoris_factors_that_do_not_fit_together_are_refused_when_parsed(roles: dict) -> None:
    with pytest.raises(LoraError, match="incomplete or do not fit together"):
        lycoris_delta("lycoris_proj_out", roles)
