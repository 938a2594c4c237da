"""Applying the memory plan: resident modules live on the GPU, offloaded ones visit it one at a time.

An offloaded module lives in pinned host memory (its **home** copy), which is never written: a visit
copies it to the GPU, where LoRAs may be fused into it, and leaving just drops the GPU copy, so the
home copy doubles as the pristine copy LoRA restores read. A `cpu-only` module runs where it is. Every
move goes through `set_storage`, which keeps each `Parameter` the same Python object (what the LoRA
fuser and compiled graphs hold) and carries a tensor subclass's inner tensors with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from flux_day.memory_plan import PINNED_ALIGN, PINNED_CHUNK, MemoryPlan, pinned_layout, tensor_bytes

log = logging.getLogger(__name__)


def set_storage(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Make `tensor` hold `value`'s storage and stay the same Python object. A wrapper subclass (torchao's
    fp8 weight) keeps its storage in inner tensors that `.data =` would leave behind, so it is swapped
    whole with `torch.utils.swap_tensors`, as `nn.Module._apply` does."""
    if not hasattr(tensor, "__tensor_flatten__") and not hasattr(value, "__tensor_flatten__"):
        tensor.data = value
        return
    parameter = isinstance(tensor, nn.Parameter)
    torch.utils.swap_tensors(
        tensor, nn.Parameter(value, requires_grad=False) if parameter else value.detach()
    )


def _leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold `tensor`'s storage: itself, or a subclass's inner tensors."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return [tensor.detach()]
    names, _ = tensor.__tensor_flatten__()
    return [leaf for name in names for leaf in _leaves(getattr(tensor, name))]


def _rebuilt(tensor: torch.Tensor, leaves: Iterator[torch.Tensor]) -> torch.Tensor:
    """`tensor` made of `leaves` (in `_leaves` order) instead of its own storage."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return next(leaves)
    names, meta = tensor.__tensor_flatten__()
    inner = {name: _rebuilt(getattr(tensor, name), leaves) for name in names}
    return type(tensor).__tensor_unflatten__(inner, meta, tensor.size(), tensor.stride())


def _copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of `tensor` on `device`, leaf by leaf: torchao's `.to(copy=True)` may return its inner
    tensors uncopied on the same device, and a visit must never write the home copy."""
    return _rebuilt(tensor, iter([leaf.to(device, non_blocking=True, copy=True) for leaf in _leaves(tensor)]))


class PinnedArena:
    """Host copies kept for the server's life (offloaded modules' home copies, by tensor, and LoRAs'
    pristine copies): views into page-locked chunks whose sizes are powers of two (`pinned_layout`).
    `pinned_bytes` is what the chunks take, `tensor_bytes` what the copies need."""

    def __init__(self, pin: bool, chunk_bytes: int = PINNED_CHUNK, align: int = PINNED_ALIGN) -> None:
        self.pin, self.chunk_bytes, self.align = pin, chunk_bytes, align
        self.pinned_bytes = self.tensor_bytes = 0
        self.homes: dict[int, torch.Tensor] = {}  # id(tensor of an offloaded module) -> its home copy
        self._open: list[tuple[torch.Tensor, int]] = []  # chunks for `copy`, and how much of each is used

    def copies(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Host copies of `tensors` (a subclass around copies of its inner tensors), packed in new chunks."""
        leaves = [leaf for tensor in tensors for leaf in _leaves(tensor)]
        layout = pinned_layout([tensor_bytes(leaf) for leaf in leaves], self.chunk_bytes, self.align)
        chunks = [self._chunk(size) for size in layout.chunks]
        copies = iter(
            self._copy_into(chunks[chunk], offset, leaf)
            for leaf, (chunk, offset) in zip(leaves, layout.places, strict=True)
        )
        return [_rebuilt(tensor, copies) for tensor in tensors]

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of one plain tensor in the first chunk with room: for copies made one at a time."""
        size = -(-tensor_bytes(tensor) // self.align) * self.align
        index = next((i for i, (chunk, used) in enumerate(self._open) if used + size <= chunk.numel()), None)
        if index is None:
            alone = pinned_layout([size], self.chunk_bytes, self.align).pinned_bytes  # a bigger tensor's own
            self._open.append((self._chunk(max(self.chunk_bytes, alone)), 0))
            index = len(self._open) - 1
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


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of `module`, each once."""
    return list({id(t): t for t in [*module.parameters(), *module.buffers()]}.values())


class Residency:
    """Where each planned module is, and the moves that keep the GPU within its plan; `on_leave(name)`
    is told when a visitor's GPU copy (LoRAs and all) is dropped."""

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
        self.modules: dict[str, nn.Module] = {}
        self.visitor: str | None = None
        for name, module in modules.items():
            self.modules[name] = module
            if plan[name] == "offloaded":
                self._make_home(name, keep_on=False)
            else:
                module.to(device if plan[name] == "resident" else "cpu")

    def home(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The pristine host copy of `tensor` when it belongs to an offloaded module, else None."""
        return self.host.homes.get(id(tensor))

    def need(self, names: Iterable[str]) -> None:
        """Make `names` available on the GPU (resident and cpu-only ones already are where they run)."""
        for name in names:
            if self.plan[name] == "offloaded" and name != self.visitor:
                self._visit(name, lambda name=name: self._bring(name))

    def add(self, name: str, build: Callable[[torch.device], nn.Module]) -> nn.Module:
        """A module made on first need (an fp8 copy), built where it runs: offloaded, on the GPU as the
        visitor once the slot is free, then given its home copy."""
        if self.plan[name] != "offloaded":
            self.modules[name] = build(self.device if self.plan[name] == "resident" else torch.device("cpu"))
        else:
            self._visit(name, lambda: self._arrive_built(name, build(self.device)))
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

    def _arrive_built(self, name: str, module: nn.Module) -> None:
        self.modules[name] = module
        self._make_home(name, keep_on=True)

    def _make_home(self, name: str, keep_on: bool) -> None:
        """Give every tensor of `name` a home copy; the module then sits there, or with `keep_on` stays
        where it is (a visitor just built on the GPU)."""
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
