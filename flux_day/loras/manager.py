"""`LoraManager`: a request's LoRA choices -> fetched, parsed and exactly fused weights.

Everything that can fail happens in `prepare` (many threads at once) before `activate` touches a weight.
Parsed LoRAs stay in an LRU bounded by `FLUX_DAY_PARSED_LORA_BYTES`, so asking again costs only the fuse.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from flux_day.config import Settings
from flux_day.errors import InputError, LoraError
from flux_day.loras.archive import unpacked
from flux_day.loras.delta_math import ScaledDelta
from flux_day.loras.downloads import LoraDownloads
from flux_day.loras.flux_layout import ModuleIndex
from flux_day.loras.formats import LoraWeights, read_lora
from flux_day.loras.fuse import UnrepresentableWeight, WeightFuser
from flux_day.loras.refs import LoraRef, LoraRequest, decode_data_uri
from flux_day.loras.safetensors_file import LoraSource
from flux_day.models import CLIP, transformer_component
from flux_day.schema import LORA_INPUTS

log = logging.getLogger(__name__)

GO_FAST_LORA_MULTIPLIER = 1.5  # the schema's lora_scale description promises it
LoraBytes = Callable[[LoraRequest], bytes]  # a LoRA file's bytes, handed over by benchmarks to time parsing
UNVERSIONED_RECHECK_S = 300  # how long `owner/model` (no version) is trusted to mean the same file
LORA_PARTS = ("text_encoder", "transformer")


class LoraManager:
    """Fetches, parses and fuses LoRAs into the weights of whichever model a request uses."""

    def __init__(
        self, settings: Settings, fuser: WeightFuser | None = None, lora_bytes: LoraBytes | None = None
    ) -> None:
        self.settings = settings
        self.lora_bytes = lora_bytes  # benchmarks: each LoRA's file bytes, instead of fetching
        self.fuser = fuser or WeightFuser()
        self.downloads = LoraDownloads(settings)
        self._parsed: OrderedDict[tuple[str, str], tuple[LoraWeights, float]] = OrderedDict()
        self._indexes: dict[str, ModuleIndex] = {}
        # Requests prepare at once in threads: the parsed memory and the indexes change under `_guard`,
        # and one LoRA is read by one thread at a time, so the others find it parsed.
        self._guard = threading.Lock()
        self._reading: weakref.WeakValueDictionary[tuple[str, str], threading.Lock] = (
            weakref.WeakValueDictionary()
        )

    def activate(
        self,
        model: str,
        components: dict[str, nn.Module],
        loras: Sequence[LoraRequest],
        go_fast: bool = False,
        parts: Sequence[str] = LORA_PARTS,
        prepared: Sequence[LoraWeights | None] | None = None,
        fp8: nn.Module | None = None,
    ) -> set[torch.Tensor]:
        """Fuse exactly `loras` into `model`'s `parts` (into `fp8`'s layers when given; other models keep
        theirs), `go_fast` scales times 1.5, `prepared` is what `prepare` read. Returns weights written."""
        index = self._index(model, components)
        multiplier = GO_FAST_LORA_MULTIPLIER if go_fast else 1.0
        if prepared is None:
            prepared = self.prepare(model, components, loras)
        chosen = [
            (lora, weights, lora.scale * multiplier)
            for lora, weights in zip(loras, prepared, strict=True)
            if weights is not None and lora.scale != 0
        ]
        plans = _plans(chosen, index)
        group = transformer_component(model, fp8 is not None)
        started, written = time.perf_counter(), set()
        try:
            if "text_encoder" in parts:
                written |= self.fuser.apply(plans["text_encoder"], CLIP)
            if "transformer" in parts:
                into = None if fp8 is None else _same_names(components["transformer"], fp8)
                written |= self.fuser.apply(plans["transformer"], group, into)
        except UnrepresentableWeight as error:  # apply restored every weight before raising
            raise _overflow_error(error, chosen, index, model) from None
        if written:
            log.info(
                "LoRAs now %s on %s: %d weights written in %.3fs",
                [f"{w.digest}x{s:g}" for _, w, s in chosen] or "none",
                group,
                len(written),
                time.perf_counter() - started,
            )
        return written

    def release(self) -> None:
        """Every touched weight back to its pristine bytes."""
        self.fuser.restore_all()

    def prepare(
        self, model: str, components: dict[str, nn.Module], loras: Sequence[LoraRequest]
    ) -> list[LoraWeights | None]:
        """Download, check and parse `loras` (None for scale 0) without touching a weight; thread-safe."""
        return [self.weights(lora, model, components) if lora.scale != 0 else None for lora in loras]

    def weights(self, lora: LoraRequest, model: str, components: dict[str, nn.Module]) -> LoraWeights:
        """The parsed LoRA for `model`, from memory, the cache or the web; errors named for its input."""
        key = (lora.ref.identity_digest, model)
        with self._guard:
            reading = self._reading.setdefault(key, threading.Lock())
        with reading:
            with self._guard:  # kept while it may still be trusted to be what `lora` names
                weights, parsed_at = self._parsed.get(key, (None, 0.0))
                if weights is not None and (
                    not _unversioned(lora.ref) or time.monotonic() - parsed_at < UNVERSIONED_RECHECK_S
                ):
                    self._parsed.move_to_end(key)
                    return weights
            return self._read(key, lora, model, components)

    def _read(
        self, key: tuple[str, str], lora: LoraRequest, model: str, components: dict[str, nn.Module]
    ) -> LoraWeights:
        started = time.perf_counter()
        index = self._index(model, components)
        opened = nullcontext(self.lora_bytes(lora)) if self.lora_bytes else self._lora_file(lora.ref)
        with LoraError.for_input(lora.input_name), opened as source:
            weights = read_lora(source, index, f"FLUX.1 [{model}]")
        log.info(
            "read %s LoRA %s for %s: %d bytes, %d target weights, in %.2fs",
            weights.layout,
            lora.ref.shown,
            lora.input_name,
            weights.nbytes,
            len(weights.deltas),
            time.perf_counter() - started,
        )
        self._keep(key, weights)
        return weights

    def _keep(self, key: tuple[str, str], weights: LoraWeights) -> None:
        """Keep `weights` parsed, evicting the least recently used past the budget (one larger than all of
        it is not kept)."""
        budget = self.settings.parsed_lora_bytes
        with self._guard:
            self._parsed.pop(key, None)
            if weights.held_bytes > budget:
                log.info(
                    "not keeping the parsed LoRA: %d bytes, over the %d-byte budget",
                    weights.held_bytes,
                    budget,
                )
                return
            self._parsed[key] = (weights, time.monotonic())
            while sum(held.held_bytes for held, _ in self._parsed.values()) > budget:
                self._parsed.popitem(last=False)

    @property
    def parsed_bytes(self) -> int:
        with self._guard:
            return sum(weights.held_bytes for weights, _ in self._parsed.values())

    def forget_parsed(self) -> None:
        """Forget every parsed LoRA (a cold switch)."""
        with self._guard:
            self._parsed.clear()

    def _index(self, model: str, components: dict[str, nn.Module]) -> ModuleIndex:
        with self._guard:
            if model not in self._indexes:
                self._indexes[model] = ModuleIndex(components)
            return self._indexes[model]

    @contextmanager
    def _lora_file(self, ref: LoraRef) -> Iterator[LoraSource]:
        """The LoRA file of `ref` (archives unpacked), read-held in the disk cache for the block; a cached
        file the block refuses is discarded, so it is fetched afresh."""
        limit = self.settings.max_lora_bytes
        if ref.kind in {"local", "data"}:  # only the operator's default LoRA is ever local
            yield unpacked(
                _local_lora(Path(ref.location)) if ref.kind == "local" else decode_data_uri(ref, limit), limit
            )
            return
        cached: Path | None = None
        try:
            with self.downloads.cached_file(ref) as cached:
                yield cached
        except LoraError:
            if cached is not None:  # refused once read; the cache's read lock is released by now
                self.downloads.cache.discard(cached)
            raise


def _plans(
    chosen: Sequence[tuple[LoraRequest, LoraWeights, float]], index: ModuleIndex
) -> dict[str, dict[torch.Tensor, list[ScaledDelta]]]:
    plans: dict[str, dict[torch.Tensor, list[ScaledDelta]]] = {part: defaultdict(list) for part in LORA_PARTS}
    for _, weights, scale in chosen:
        for updates, params in ((weights.deltas, index.weights), (weights.biases, index.biases)):
            for module, delta in updates.items():
                part = module.split(".", 1)[0]
                plans[part][params[module]].append(ScaledDelta(weights.digest, delta, scale))
    return plans


def _overflow_error(
    error: UnrepresentableWeight,
    chosen: Sequence[tuple[LoraRequest, LoraWeights, float]],
    index: ModuleIndex,
    model: str,
) -> InputError:
    names = {id(param): name for name, param in (*index.weights.items(), *index.biases.items())}
    module = names.get(id(error.param), "a weight")
    inputs = [lora for lora, weights, _ in chosen if weights.digest in error.orders]
    scales = ", ".join(LORA_INPUTS.get(lora.input_name, "lora_scale") for lora in inputs)
    limit = torch.finfo(error.param.dtype).max
    return InputError(
        f"{', '.join(lora.input_name for lora in inputs)}: fused into FLUX.1 [{model}], this LoRA pushes "
        f"{module[:80]!r} past the largest value its {str(error.param.dtype).removeprefix('torch.')} "
        f"weights can hold ({limit:.4g}), which would make every image black; lower {scales} or use "
        "another LoRA."
    )


def _same_names(master: nn.Module, copy: nn.Module) -> Mapping[torch.Tensor, torch.Tensor]:
    named = dict(copy.named_parameters())
    return {param: named[name] for name, param in master.named_parameters()}


def _unversioned(ref: LoraRef) -> bool:
    """Whether `ref` names whatever a service currently serves (no version given)."""
    return ref.kind in {"replicate", "huggingface", "civitai"} and not ref.version


def _local_lora(path: Path) -> Path:
    """An operator's LoRA path: a file, or a folder holding one LoRA file (as `cog` passes weights)."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.tar"))
        path = files[0] if len(files) == 1 else path
    if not path.is_file():
        raise LoraError(f"{path} is not a file; point it at a .safetensors LoRA.")
    return path
