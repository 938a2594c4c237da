"""Applying the memory plan: resident components live on the GPU, offloaded ones visit it one at a time.

`memory_plan.plan_memory` decides (a pure function, tested per card size); this moves modules. An
offloaded component is brought in when a request needs it, sending the previous visitor back to CPU
RAM first, so the GPU never holds more than the resident set plus the plan's one swap slot. A
`cpu-only` component (larger than any slot this card allows) is run where it is, on the CPU: slow,
but the request is served, and the plan's log table said so at setup.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from flux_day.memory_plan import MemoryPlan

log = logging.getLogger(__name__)


class Residency:
    """Where each planned module is, and the moves that keep the GPU within its plan."""

    def __init__(self, modules: Mapping[str, nn.Module], plan: MemoryPlan, device: torch.device) -> None:
        self.modules, self.plan, self.device = dict(modules), plan, device
        self.visitor: str | None = None
        for name, module in self.modules.items():
            module.to(device if plan[name] == "resident" else torch.device("cpu"))

    def need(self, names: Iterable[str]) -> None:
        """Make `names` available on the GPU (the resident ones already are)."""
        for name in names:
            if self.plan[name] != "offloaded" or name == self.visitor:
                continue
            started = time.perf_counter()
            try:
                if self.visitor is not None:
                    self.modules[self.visitor].to("cpu")
                self.modules[name].to(self.device)
            except BaseException:
                # A cancel mid-move leaves modules half on the GPU: send both back, so the next
                # request starts from the plan's state (one visitor at most).
                for moved in {self.visitor, name} - {None}:
                    self.modules[moved].to("cpu")
                self.visitor = None
                raise
            log.info(
                "memory plan: %s moved onto the GPU (for %s) in %.2fs",
                name,
                self.visitor,
                time.perf_counter() - started,
            )
            self.visitor = name
