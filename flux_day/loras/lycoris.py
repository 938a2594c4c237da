"""LyCORIS LoKr and LoHa updates, kept in their factors until the fuse expands them row by row.

diffusers 0.42.1 reads LoKr only for FLUX.2 and LoHa not at all; PEFT 0.21 expands them whole, and a
full-coverage LoKr expanded whole is a second transformer in memory. The formulas are LyCORIS' own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flux_day.errors import LoraError
from flux_day.loras.delta_math import rotated_rows

LYCORIS_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LYCORIS_ROLES += ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


@dataclass(frozen=True)
class Product:
    """A LyCORIS factor: a matrix stored whole (`b` is None) or as a low-rank product `a @ b`."""

    a: torch.Tensor
    b: torch.Tensor | None = None

    def __post_init__(self) -> None:
        fits = self.b is None or (self.b.ndim == 2 and self.a.shape[1] == self.b.shape[0])
        if self.a.ndim != 2 or not fits:
            raise ValueError("the factors are not matrices that multiply")

    @classmethod
    def stored(cls, roles: dict[str, torch.Tensor], name: str) -> Product:
        """Factor `name` as the file stores it: whole, or as `<name>_a @ <name>_b`."""
        return cls(roles[name]) if name in roles else cls(roles[f"{name}_a"], roles[f"{name}_b"])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a.shape[0], (self.a if self.b is None else self.b).shape[1])

    def rows(self, rows: slice | torch.Tensor, device: torch.device) -> torch.Tensor:
        a = self.a[rows].to(device, torch.float32)
        return a if self.b is None else a @ self.b.to(device, torch.float32)

    def moved(self, device: torch.device) -> Product:
        b = None if self.b is None else self.b.to(device, torch.float32)
        return Product(self.a.to(device, torch.float32), b)


@dataclass(frozen=True)
class Kronecker:
    """LoKr: `scale · kron(w1, w2)`, or `count` of its rows from row `first_row` on, wrapping past the
    last (where a BFL module's rows are split over diffusers' linears)."""

    w1: Product
    w2: Product
    scale: float
    first_row: int
    count: int

    @property
    def height(self) -> int:
        return self.w1.shape[0] * self.w2.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.count, self.w1.shape[1] * self.w2.shape[1])

    def rows(self, rows: slice, device: torch.device, times: float = 1.0) -> torch.Tensor:
        """`times · scale ·` rows: row r of kron(w1, w2) is w1[r // h2] ⊗ w2[r % h2], as `torch.kron`."""
        start, stop, _ = rows.indices(self.count)
        index = (self.first_row + torch.arange(start, stop, device=device)) % self.height
        w1 = self.w1.rows(index // self.w2.shape[0], device)
        w2 = self.w2.rows(index % self.w2.shape[0], device)
        block = (w1.unsqueeze(2) * w2.unsqueeze(1)).reshape(len(index), -1)
        factor = times * self.scale
        return block.mul_(factor) if factor != 1 else block

    def rows_from(self, first: int, count: int) -> Kronecker:
        """`count` rows from row `first` on (indices only: the factors are shared)."""
        return Kronecker(self.w1, self.w2, self.scale, (self.first_row + first) % self.height, count)

    def prepared(self, device: torch.device) -> Kronecker:
        """w1 and w2 computed once, whole, in float32 on `device`: every chunk reads them."""
        whole = [Product(w.rows(slice(None), device)) for w in (self.w1, self.w2)]
        return Kronecker(whole[0], whole[1], self.scale, self.first_row, self.count)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for w in (self.w1, self.w2) for t in (w.a, w.b) if t is not None)


@dataclass(frozen=True)
class Hadamard:
    """LoHa: `scale · (a1 @ b1) * (a2 @ b2)`, two low-rank products multiplied element by element."""

    first: Product
    second: Product
    scale: float

    @property
    def shape(self) -> tuple[int, ...]:
        return self.first.shape

    def rows(self, rows: slice, device: torch.device, times: float = 1.0) -> torch.Tensor:
        """`times · scale · (a1[rows] @ b1) * (a2[rows] @ b2)`. CPU BLAS computes a row alike in blocks of a
        multiple of 8 rows (`CHUNK_ROWS`), so chunks give the whole product's bytes (bar a ragged tail)."""
        block = self.first.rows(rows, device).mul_(self.second.rows(rows, device))
        factor = times * self.scale
        return block.mul_(factor) if factor != 1 else block

    def rows_from(self, first: int, count: int) -> Hadamard:
        """`count` rows from row `first` on: those rows of each product's left factor."""
        one, two = (Product(rotated_rows(p.a, first, count), p.b) for p in (self.first, self.second))
        return Hadamard(one, two, self.scale)

    def prepared(self, device: torch.device) -> Hadamard:
        """The four factors in float32 on `device`, moved once for every chunk."""
        return Hadamard(self.first.moved(device), self.second.moved(device), self.scale)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for p in (self.first, self.second) for t in (p.a, p.b) if t is not None)


def lycoris_delta(module: str, roles: dict[str, torch.Tensor]) -> Kronecker | Hadamard:
    """The update `roles` (a LoKr or LoHa module's tensors, plus `alpha`) encodes, still factored. LoKr
    applies alpha/rank only where a factor is stored as a low-rank product, LoHa always."""
    if any(role in roles for role in ("lokr_t2", "hada_t1", "hada_t2")):
        raise LoraError(
            f"module {module[:80]!r} uses Tucker-decomposed LyCORIS factors, which FLUX's "
            "linear layers cannot take; give a LoRA, LoKr or LoHa trained for FLUX.1."
        )
    try:
        if any(role.startswith("lokr_") for role in roles):
            w1, w2 = Product.stored(roles, "lokr_w1"), Product.stored(roles, "lokr_w2")
            rank_factor = roles.get("lokr_w2_b", roles.get("lokr_w1_b"))
            scale = 1.0
            if rank_factor is not None and "alpha" in roles:
                scale = roles["alpha"].item() / rank_factor.shape[0]
            return Kronecker(w1, w2, scale, 0, w1.shape[0] * w2.shape[0])
        first, second = Product.stored(roles, "hada_w1"), Product.stored(roles, "hada_w2")
        if first.shape != second.shape:
            raise ValueError("the two products differ in shape")
        rank = roles["hada_w1_b"].shape[0]
        return Hadamard(first, second, (roles["alpha"].item() if "alpha" in roles else rank) / rank)
    except (KeyError, ValueError):
        raise LoraError(
            f"the LyCORIS factors of module {module[:80]!r} are incomplete or do not fit "
            "together; the file is damaged or not for FLUX.1."
        ) from None
