"""Applying the memory plan: resident components live on the GPU, offloaded ones visit it one at a time.

`memory_plan.plan_memory` decides (a pure function, tested per card size) and `memory_plan.visit`
says which visitor leaves; this moves tensors. An offloaded component lives in pinned host memory (its
**home** copy), which is never written: a visit copies it to the GPU, where LoRAs may be fused into
it, and leaving just drops the GPU copy (no copy back, and the home copy doubles as the pristine copy
LoRA restores read). Modules made on first use (fp8 copies) are built when first needed, on the GPU,
and given a home copy then if the plan offloads them. A `cpu-only` component (larger than any slot
this card allows) runs where it is, on the CPU: slow, but served, and the setup log's table says so.

Home copies (and LoRAs' host pristine copies, `loras.pristine`) are views into one `PinnedArena`,
packed into power-of-two chunks so the pinned allocator's rounding costs a few percent, not 1.5x.
Every move goes through `set_storage`, which keeps each `Parameter` the same Python object (the LoRA
fuser's and torch.compile's references) and carries a tensor subclass's inner tensors with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from flux_day.memory_plan import PINNED_ALIGN, PINNED_CHUNK, MemoryPlan, pinned_layout, tensor_bytes, visit

log = logging.getLogger(__name__)

Builder = Callable[[torch.device], nn.Module]


def set_storage(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Make `tensor` hold `value`'s storage and stay the same Python object (what the LoRA fuser's slots,
    the home-copy table keyed by `id` and compiled graphs refer to).

    `.data =` is enough for a plain tensor. A wrapper subclass (torchao's fp8 `Float8Tensor`) keeps its
    storage in inner tensors (`qdata`, `scale`) that `.data =` would leave where they were, so it is
    swapped whole with `torch.utils.swap_tensors`, as `nn.Module._apply` does for these.
    """
    if not _is_subclass(tensor) and not _is_subclass(value):
        tensor.data = value
        return
    replacement = (
        nn.Parameter(value, requires_grad=False) if isinstance(tensor, nn.Parameter) else value.detach()
    )
    torch.utils.swap_tensors(tensor, replacement)


def _is_subclass(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "__tensor_flatten__")


def _leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold `tensor`'s storage: itself, or a subclass's inner tensors."""
    if not _is_subclass(tensor):
        return [tensor.detach()]
    names, _ = tensor.__tensor_flatten__()
    return [leaf for name in names for leaf in _leaves(getattr(tensor, name))]


def _rebuilt(tensor: torch.Tensor, leaves: Iterator[torch.Tensor]) -> torch.Tensor:
    """`tensor` made of `leaves` (in `_leaves` order) instead of its own storage."""
    if not _is_subclass(tensor):
        return next(leaves)
    names, meta = tensor.__tensor_flatten__()
    inner = {name: _rebuilt(getattr(tensor, name), leaves) for name in names}
    return type(tensor).__tensor_unflatten__(inner, meta, tensor.size(), tensor.stride())


def _copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of `tensor` on `device`, leaf by leaf: a subclass's own `.to(copy=True)` may return its
    inner tensors uncopied when the device is the same (torchao's does), and a visit must never write
    the home copy (a CPU engine planned as a GPU runs exactly that move)."""
    copies = (leaf.to(device, non_blocking=True, copy=True) for leaf in _leaves(tensor))
    return _rebuilt(tensor, iter(copies))


class PinnedArena:
    """Host memory for copies kept for the server's life (home copies, pristine copies): views into
    chunks whose sizes are powers of two, page-locked with `pin` (fast, asynchronous copies to a GPU).

    Nothing is freed: the copies live as long as the modules they belong to. `pinned_bytes` is what
    the chunks take (what the pinned allocator really reserves), `tensor_bytes` what the copies need.
    """

    def __init__(self, pin: bool, chunk_bytes: int = PINNED_CHUNK, align: int = PINNED_ALIGN) -> None:
        self.pin, self.chunk_bytes, self.align = pin, chunk_bytes, align
        self.pinned_bytes = self.tensor_bytes = 0
        self._open: list[tuple[torch.Tensor, int]] = []  # chunks for `copy`, and how much of each is used

    def copies(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Host copies of `tensors` (a subclass rebuilt around copies of its inner tensors), packed
        together into new chunks by `memory_plan.pinned_layout`."""
        leaves = [leaf for tensor in tensors for leaf in _leaves(tensor)]
        layout = pinned_layout([tensor_bytes(leaf) for leaf in leaves], self.chunk_bytes, self.align)
        chunks = [self._chunk(size) for size in layout.chunks]
        copies = iter(
            self._copy_into(chunks[chunk], offset, leaf)
            for leaf, (chunk, offset) in zip(leaves, layout.places, strict=True)
        )
        return [_rebuilt(tensor, copies) for tensor in tensors]

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of one plain tensor in the first chunk with room (a new one when none has): for
        copies made one at a time (LoRAs' pristine copies), whose total is not known in advance."""
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
        view = chunk[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
        return view.copy_(tensor)


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter and buffer of `module`, each once."""
    seen: set[int] = set()
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


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
        self.host = PinnedArena(pin=device.type == "cuda")  # home copies; LoRAs' host pristine copies too
        for name, module in self.modules.items():
            placement = plan[name]
            if placement == "resident":
                module.to(device)
            elif placement == "offloaded":
                self._make_home(name)
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
            self._make_home(name, keep_on=True)

    def _make_home(self, name: str, keep_on: bool = False) -> None:
        """Give every tensor of module `name` a host copy in the arena; the module then sits there (or,
        with `keep_on`, stays where it is: a visitor just built on the GPU)."""
        tensors = list(_tensors(self.modules[name]))
        before = self.host.tensor_bytes
        for tensor, home in zip(tensors, self.host.copies(tensors), strict=True):
            self._home[id(tensor)] = home
            if not keep_on:
                set_storage(tensor, home)
        log.info(
            "memory plan: %s's home copy, %.2f GB, made in %s host memory, which now holds %.2f GB of"
            " copies in %.2f GB",
            name,
            (self.host.tensor_bytes - before) / 1e9,
            "pinned" if self.host.pin else "ordinary (no GPU)",
            self.host.tensor_bytes / 1e9,
            self.host.pinned_bytes / 1e9,
        )

    def _bring(self, name: str) -> None:
        for tensor in _tensors(self.modules[name]):
            set_storage(tensor, _copy_to(self._home[id(tensor)], self.device))

    def _send_home(self, name: str) -> None:
        for tensor in _tensors(self.modules[name]):
            set_storage(tensor, self._home[id(tensor)])
