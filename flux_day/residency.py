"""Applying the memory plan: resident modules live on the GPU, offloaded ones visit it one at a time.

An offloaded module's pinned **home** copy is never written (a visit's LoRAs leave with its GPU copy),
so it doubles as the pristine copy. Every move keeps each `Parameter` the same Python object
(`set_storage`): the LoRA fuser and compiled graphs hold them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from flux_day.memory_plan import PINNED_ALIGN, PINNED_CHUNK, MemoryPlan, pinned_layout

log = logging.getLogger(__name__)


def set_storage(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Make `tensor` hold `value`'s storage, same object. A subclass (torchao fp8) keeps storage in inner
    tensors that `.data =` would leave behind (a leak), so it is swapped whole, as `nn.Module._apply` does."""
    if not hasattr(tensor, "__tensor_flatten__") and not hasattr(value, "__tensor_flatten__"):
        tensor.data = value
        return
    parameter = isinstance(tensor, nn.Parameter)
    torch.utils.swap_tensors(
        tensor, nn.Parameter(value, requires_grad=False) if parameter else value.detach()
    )


def inner_tensors(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A tensor subclass's plain inner tensors (torchao fp8: `qdata`, `scale`), or {"": weight}."""
    if hasattr(weight, "__tensor_flatten__"):
        names, _ = weight.__tensor_flatten__()
        return {name: getattr(weight, name) for name in names}
    return {"": weight}


def _leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    if not hasattr(tensor, "__tensor_flatten__"):
        return [tensor.detach()]
    return [leaf for inner in inner_tensors(tensor).values() for leaf in _leaves(inner)]


def _rebuilt(tensor: torch.Tensor, leaves: Iterator[torch.Tensor]) -> torch.Tensor:
    if not hasattr(tensor, "__tensor_flatten__"):
        return next(leaves)
    _, meta = tensor.__tensor_flatten__()
    inner = {name: _rebuilt(value, leaves) for name, value in inner_tensors(tensor).items()}
    return type(tensor).__tensor_unflatten__(inner, meta, tensor.size(), tensor.stride())


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really holds: a subclass's (torchao fp8) are its leaves', as its own `element_size()`
    reports the dtype it stands in for."""
    return sum(leaf.numel() * leaf.element_size() for leaf in _leaves(tensor))


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return list({id(t): t for t in [*module.parameters(), *module.buffers()]}.values())


def module_bytes(module: nn.Module) -> int:
    return sum(tensor_bytes(tensor) for tensor in _tensors(module))


def _copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy on `device`, leaf by leaf: torchao's `.to(copy=True)` may return inner tensors uncopied."""
    return _rebuilt(tensor, iter([leaf.to(device, non_blocking=True, copy=True) for leaf in _leaves(tensor)]))


class PinnedArena:
    """Host copies kept for the server's life (home copies by tensor id, LoRAs' pristine copies): views
    into page-locked chunks sized in powers of two (`pinned_layout`)."""

    def __init__(self, pin: bool, chunk_bytes: int = PINNED_CHUNK, align: int = PINNED_ALIGN) -> None:
        self.pin, self.chunk_bytes, self.align = pin, chunk_bytes, align
        self.pinned_bytes = self.tensor_bytes = 0
        self.homes: dict[int, torch.Tensor] = {}  # id(tensor of an offloaded module) -> its home copy
        self._open: list[tuple[torch.Tensor, int]] = []  # chunks for `copy`, and how much of each is used

    def copies(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Host copies of `tensors`, packed in new chunks."""
        leaves = [leaf for tensor in tensors for leaf in _leaves(tensor)]
        layout = pinned_layout([tensor_bytes(leaf) for leaf in leaves], self.chunk_bytes, self.align)
        chunks = [self._chunk(size) for size in layout.chunks]
        copies = iter(
            self._copy_into(chunks[chunk], offset, leaf)
            for leaf, (chunk, offset) in zip(leaves, layout.places, strict=True)
        )
        return [_rebuilt(tensor, copies) for tensor in tensors]

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of one plain tensor, in the first chunk with room."""
        size = -(-tensor_bytes(tensor) // self.align) * self.align
        room = (i for i, (chunk, used) in enumerate(self._open) if used + size <= chunk.numel())
        index = next(room, len(self._open))
        if index == len(self._open):
            alone = pinned_layout([size], self.chunk_bytes, self.align).pinned_bytes  # a bigger tensor's own
            self._open.append((self._chunk(max(self.chunk_bytes, alone)), 0))
        chunk, used = self._open[index]
        self._open[index] = (chunk, used + size)
        return self._copy_into(chunk, used, tensor.detach())

    def _chunk(self, size: int) -> torch.Tensor:
        self.pinned_bytes += size
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)

    def _copy_into(self, chunk: torch.Tensor, offset: int, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor_bytes(tensor)
        self.tensor_bytes += nbytes
        return chunk[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)


class Residency:
    """Where each planned module is; `on_leave(name)` is told when a visitor's GPU copy is dropped."""

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        plan: MemoryPlan,
        device: torch.device,
        host: PinnedArena | None = None,
        on_leave: Callable[[str], None] = lambda name: None,
    ) -> None:
        self.plan, self.device, self.on_leave = plan, device, on_leave
        self.host = host or PinnedArena(pin=device.type == "cuda")
        self.modules: dict[str, nn.Module] = dict(modules)
        self.visitor: str | None = None
        for name, module in modules.items():
            if plan[name] == "offloaded":
                self._make_home(name, keep_on=False)
            else:
                module.to(device if plan[name] == "resident" else "cpu")

    def home(self, tensor: torch.Tensor) -> torch.Tensor | None:
        return self.host.homes.get(id(tensor))

    def need(self, names: Iterable[str]) -> None:
        """Make `names` available on the GPU (resident and cpu-only ones already are where they run)."""
        for name in names:
            if self.plan[name] == "offloaded" and name != self.visitor:
                self._visit(name, lambda name=name: self._bring(name))

    def add(self, name: str, build: Callable[[torch.device], nn.Module]) -> nn.Module:
        """A module made on first need (an fp8 copy), built where it runs (an offloaded one on the GPU,
        once the slot is free, then given its home copy)."""
        if self.plan[name] != "offloaded":
            self.modules[name] = build(self.device if self.plan[name] == "resident" else torch.device("cpu"))
        else:

            def arrive() -> None:
                self.modules[name] = build(self.device)
                self._make_home(name, keep_on=True)

            self._visit(name, arrive)
        return self.modules[name]

    def _visit(self, name: str, arrive: Callable[[], None]) -> None:
        started, leaving = time.perf_counter(), self.visitor
        self.visitor = None
        try:
            if leaving is not None:
                self._send_home(leaving)
            arrive()
        except BaseException:  # a cancel mid-move: sent home whole, so the next request starts clean
            if name in self.modules:
                self._send_home(name)
            raise
        self.visitor = name
        took = time.perf_counter() - started
        log.info("memory plan: %s on the GPU (%s left) in %.2fs", name, leaving or "nothing", took)

    def _make_home(self, name: str, keep_on: bool) -> None:
        """Give every tensor of `name` a home copy, and move it there unless `keep_on`."""
        tensors, before = _tensors(self.modules[name]), self.host.tensor_bytes
        for tensor, home in zip(tensors, self.host.copies(tensors), strict=True):
            self.host.homes[id(tensor)] = home
            if not keep_on:
                set_storage(tensor, home)
        log.info(
            "memory plan: %s's home copy, %.2f GB, made in %s host memory (%.2f GB of copies in %.2f GB)",
            name,
            (self.host.tensor_bytes - before) / 1e9,
            "pinned" if self.host.pin else "ordinary",
            self.host.tensor_bytes / 1e9,
            self.host.pinned_bytes / 1e9,
        )

    def _bring(self, name: str) -> None:
        for tensor in _tensors(self.modules[name]):
            set_storage(tensor, _copy_to(self.host.homes[id(tensor)], self.device))

    def _send_home(self, name: str) -> None:
        for tensor in _tensors(self.modules[name]):
            set_storage(tensor, self.host.homes[id(tensor)])
        self.on_leave(name)
