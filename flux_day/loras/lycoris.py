"""LyCORIS LoKr and LoHa factors expanded to the full update of one linear.

diffusers 0.42.1 reads LoKr only for FLUX.2 and LoHa not at all, and PEFT computes these updates only
inside layers it has injected, so the two formulas are written here (LyCORIS' own definitions):
LoKr `kron(w1, w2)`, LoHa `(w1_a @ w1_b) * (w2_a @ w2_b)`, each times alpha/rank where LyCORIS
applies it. Tucker-decomposed (convolution) factors cannot occur in FLUX's linears and are refused.
"""

from __future__ import annotations

import torch

from flux_day.errors import LoraError

LYCORIS_ROLES = (
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
)


def lycoris_delta(module: str, roles: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 update `roles` (a LoKr or LoHa module's tensors, plus `alpha`) encodes."""
    if any(role in roles for role in ("lokr_t2", "hada_t1", "hada_t2")):
        raise LoraError(
            f"module {module[:80]!r} uses Tucker-decomposed LyCORIS factors, which FLUX's "
            "linear layers cannot take; give a LoRA, LoKr or LoHa trained for FLUX.1."
        )
    try:
        if any(role.startswith("lokr_") for role in roles):
            return _lokr(roles)
        return _loha(roles)
    except (KeyError, RuntimeError):
        raise LoraError(
            f"the LyCORIS factors of module {module[:80]!r} are incomplete or do not fit "
            "together; the file is damaged or not for FLUX.1."
        ) from None


def _lokr(roles: dict[str, torch.Tensor]) -> torch.Tensor:
    """LoKr: kron(w1, w2); alpha/rank applies only when a factor is stored as a low-rank product."""
    w1 = roles["lokr_w1"] if "lokr_w1" in roles else roles["lokr_w1_a"] @ roles["lokr_w1_b"]
    w2 = roles["lokr_w2"] if "lokr_w2" in roles else roles["lokr_w2_a"] @ roles["lokr_w2_b"]
    rank_factor = roles.get("lokr_w2_b", roles.get("lokr_w1_b"))
    scale = 1.0
    if rank_factor is not None and "alpha" in roles:
        scale = roles["alpha"].item() / rank_factor.shape[0]
    return torch.kron(w1, w2) * scale


def _loha(roles: dict[str, torch.Tensor]) -> torch.Tensor:
    """LoHa: the elementwise product of two low-rank products, times alpha/rank."""
    first = roles["hada_w1_a"] @ roles["hada_w1_b"]
    second = roles["hada_w2_a"] @ roles["hada_w2_b"]
    rank = roles["hada_w1_b"].shape[0]
    alpha = roles["alpha"].item() if "alpha" in roles else rank
    return first * second * (alpha / rank)
