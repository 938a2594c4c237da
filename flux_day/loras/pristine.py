"""Where the pristine copies that undo a LoRA fuse live (a decision of the memory plan).

On the GPU a copy stays on the device while the plan's room for pristine copies lasts, else it goes to
pinned host memory (a restore then reads it over PCIe: no arithmetic runs on the host), into the same
`residency.PinnedArena` as the offloaded modules' home copies. On the CPU a weight's own memory
becomes its pristine copy, and the fused weight gets fresh memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flux_day.memory_plan import MemoryPlan, pristine_site
from flux_day.residency import PinnedArena


class PristineStore:
    """Where pristine copies live: on the weight's GPU while the memory plan's room for them lasts,
    else in pinned host memory (restores then read them over PCIe; no arithmetic runs on the host).

    `home` names a pristine copy that already exists elsewhere (an offloaded module's host copy,
    which the residency keeps pristine), so no second copy is made for it. `host` is where host copies
    go: the residency's arena, so one count says what is pinned.
    """

    def __init__(
        self,
        plan: MemoryPlan | None = None,
        home: Callable[[torch.Tensor], torch.Tensor | None] = lambda tensor: None,
        host: PinnedArena | None = None,
    ) -> None:
        self.plan = plan
        self.home = home
        self.host = host or PinnedArena(pin=torch.cuda.is_available())
        self.device_bytes = 0  # kept on the GPU so far: what the plan's room is measured against

    def adopts(self, param: torch.Tensor) -> bool:
        """Whether `param`'s own memory can become its pristine copy (a plain tensor on the CPU, where
        pristine copies live beside the weights anyway) instead of a copy being made."""
        return not param.is_cuda and not hasattr(param, "__tensor_flatten__") and param.is_contiguous()

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` that nothing else writes."""
        tensor = tensor.detach()
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.is_cuda and self.plan is not None:
            if pristine_site(self.plan, self.device_bytes, nbytes) == "host":
                return self.host.copy(tensor)
            self.device_bytes += nbytes
        return tensor.clone()
