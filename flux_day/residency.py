"""Applying the memory plan: resident components live on the GPU, offloaded ones visit it one at a time.

`memory_plan.plan_memory` decides (a pure function, tested per card size) and `memory_plan.visit`
says which visitor leaves; this moves tensors. An offloaded component lives in pinned host memory (its
**home** copy), which is never written: a visit copies it to the GPU, where LoRAs may be fused into
it, and leaving just drops the GPU copy (no copy back, and the home copy doubles as the pristine copy
LoRA restores read). Modules made on first use (fp8 copies) are built when first needed, on the GPU,
and given a home copy then if the plan offloads them. A `cpu-only` component (larger than any slot
this card allows) runs where it is, on the CPU: slow, but served, and the setup log's table says so.

Tensors are swapped with `param.data = ...`, as `nn.Module.to` does, so every `Parameter` object (the
LoRA fuser's and torch.compile's references) stays the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from flux_day.memory_plan import MemoryPlan, visit

log = logging.getLogger(__name__)

Builder = Callable[[torch.device], nn.Module]


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter and buffer of `module`, each once."""
    seen: set[int] = set()
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy in page-locked memory when CUDA is there (fast, asynchronous copies), else a copy.
    A tensor subclass (a torchao fp8 weight) is rebuilt around pinned copies of its inner tensors."""
    tensor = tensor.detach()
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None:
        names, meta = flatten()
        inner = {name: _pinned(getattr(tensor, name)) for name in names}
        return type(tensor).__tensor_unflatten__(inner, meta, tensor.size(), tensor.stride())
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=torch.cuda.is_available())
    return host.copy_(tensor)


class Residency:
    """Where each planned module is, and the moves that keep the GPU within its plan."""

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        plan: MemoryPlan,
        device: torch.device,
        builders: Mapping[str, Builder] | None = None,
    ) -> None:
        self.plan, self.device = plan, device
        self.modules: dict[str, nn.Module] = dict(modules)
        self.builders = dict(builders or {})
        self.visitor: str | None = None
        self.on_leave: Callable[[str], None] = lambda name: None  # the LoRA fuser forgets its state
        self._home: dict[int, torch.Tensor] = {}  # id(tensor) -> its pristine host copy
        for name, module in self.modules.items():
            placement = plan[name]
            if placement == "resident":
                module.to(device)
            elif placement == "offloaded":
                self._make_home(module)
            else:
                module.to("cpu")

    def module(self, name: str) -> nn.Module:
        """The module `name`, built first if it is made on first use."""
        if name not in self.modules:
            self.need([name])
        return self.modules[name]

    def built(self, name: str) -> bool:
        return name in self.modules

    def home(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The pristine host copy of `tensor` when it belongs to an offloaded module, else None."""
        return self._home.get(id(tensor))

    def need(self, names: Iterable[str]) -> None:
        """Make `names` available on the GPU (the resident ones already are); a visitor sent home has
        its GPU copy, LoRAs and all, dropped, and `on_leave(name)` is told."""
        for name in names:
            placement = self.plan[name]
            if name in self.modules and (placement != "offloaded" or name == self.visitor):
                continue
            leaving = visit(self.plan, self.visitor, name) if placement == "offloaded" else None
            started = time.perf_counter()
            try:
                if leaving is not None:
                    self.visitor = None
                    self._send_home(leaving)
                    self.on_leave(leaving)
                if name not in self.modules:
                    self._build(name)
                else:
                    self._bring(name)
            except BaseException:
                # A cancel mid-move leaves a module half on the GPU: send it home, so the next request
                # starts from the plan's state (one visitor at most).
                if name in self.modules and placement == "offloaded":
                    self._send_home(name)
                    self.on_leave(name)
                raise
            if placement == "offloaded":
                self.visitor = name
            log.info(
                "memory plan: %s on the %s (%s left) in %.2fs",
                name,
                "CPU" if placement == "cpu-only" else "GPU",
                leaving or "nothing",
                time.perf_counter() - started,
            )

    def _build(self, name: str) -> None:
        placement = self.plan[name]
        module = self.builders[name](torch.device("cpu") if placement == "cpu-only" else self.device)
        self.modules[name] = module
        if placement == "offloaded":  # built on the GPU as the visitor; its home copy is made now
            self._make_home(module, keep_on=True)

    def _make_home(self, module: nn.Module, keep_on: bool = False) -> None:
        """Give every tensor of `module` a pinned host copy; the module then sits there (or, with
        `keep_on`, stays where it is: a visitor just built on the GPU)."""
        for tensor in _tensors(module):
            home = _pinned(tensor)
            self._home[id(tensor)] = home
            if not keep_on:
                tensor.data = home

    def _bring(self, name: str) -> None:
        for tensor in _tensors(self.modules[name]):
            home = self._home[id(tensor)]
            tensor.data = home.to(self.device, non_blocking=True, copy=True)

    def _send_home(self, name: str) -> None:
        for tensor in _tensors(self.modules[name]):
            tensor.data = self._home[id(tensor)]
