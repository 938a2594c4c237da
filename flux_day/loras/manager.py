"""`LoraManager`: a request's LoRA choices → fetched, parsed and exactly fused weights.

Parsed LoRAs are kept in an in-memory LRU keyed by reference and model and bounded by the bytes their
tensors hold (`FLUX_DAY_PARSED_LORA_BYTES`), so asking again for a LoRA just used costs only the fuse;
asking for exactly the LoRAs already fused costs nothing.
Everything that can fail (download, parse, fit) happens before any weight is touched: `prepare` does it
(many requests' threads at once, one read per LoRA), `activate` fuses (one request at a time).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flux_day.components import CLIP
from flux_day.config import Settings
from flux_day.errors import InputError, LoraError
from flux_day.loras.archive import unpacked
from flux_day.loras.downloads import LoraDownloads
from flux_day.loras.flux_layout import ModuleIndex
from flux_day.loras.formats import LoraWeights, read_lora
from flux_day.loras.fuse import (
    FusedState,
    PristineStore,
    ScaledDelta,
    Slot,
    UnrepresentableWeight,
    WeightFuser,
)
from flux_day.loras.refs import LoraRef, LoraRequest, decode_data_uri
from flux_day.loras.safetensors_file import LoraSource

log = logging.getLogger(__name__)

GO_FAST_LORA_MULTIPLIER = 1.5  # the schema's lora_scale description promises it
LoraBytes = Callable[[LoraRequest], bytes]  # a LoRA file's bytes, handed over by benchmarks to time parsing
UNVERSIONED_RECHECK_S = 300  # how long `owner/model` (no version) is trusted to mean the same file


@dataclass(frozen=True)
class LoraTargets:
    """Where a request's LoRAs go: the transformer that runs (`group` is its memory-plan name), its
    full-precision master (the pristine source of an fp8 copy's fused layers), and CLIP's encoder."""

    group: str
    transformer: nn.Module
    master: nn.Module
    text_encoder: nn.Module
    quantize: Callable[[torch.Tensor], torch.Tensor] | None = None  # set when `transformer` is fp8

    @property
    def components(self) -> dict[str, nn.Module]:
        """The modules LoRA files name, as `ModuleIndex` reads them (the master's names)."""
        return {"transformer": self.master, "text_encoder": self.text_encoder}


LORA_PARTS = ("text_encoder", "transformer")


class LoraManager:
    """Fetches, parses and fuses LoRAs into the weights of whichever model a request uses."""

    def __init__(
        self, settings: Settings, store: PristineStore | None = None, lora_bytes: LoraBytes | None = None
    ) -> None:
        self.settings = settings
        self.lora_bytes = lora_bytes  # given: each LoRA's file bytes, in place of download or decoding
        self.fuser = WeightFuser(store)
        self.downloads = LoraDownloads(settings)
        self._parsed: OrderedDict[tuple[str, str], tuple[LoraWeights, float]] = OrderedDict()
        self._indexes: dict[str, ModuleIndex] = {}
        self._slots: dict[str, Slot] = {}
        self._groups: tuple[str, ...] = ()  # what the last activation wrote into
        # Requests prepare at once in threads: the parsed memory and the indexes change under `_guard`,
        # and one LoRA is read by one thread at a time, so the others find it parsed.
        self._guard = threading.Lock()
        self._reading: weakref.WeakValueDictionary[tuple[str, str], threading.Lock] = (
            weakref.WeakValueDictionary()
        )

    def activate(
        self,
        model: str,
        targets: LoraTargets,
        loras: Sequence[LoraRequest],
        go_fast: bool = False,
        parts: Sequence[str] = LORA_PARTS,
        prepared: Sequence[LoraWeights | None] | None = None,
    ) -> FusedState:
        """Fuse exactly `loras` (scale 0 ones skipped) into what the request runs on, restoring what
        else was fused there; other models and precisions keep their state. `parts` limits the
        write to the text encoder or the transformer (the engine fuses CLIP before encoding and the
        transformer once it is on the GPU). `go_fast` applies the schema's 1.5x to every scale.
        `prepared`: what `prepare` read for these `loras`, else they are read here."""
        index = self._index(model, targets.components)
        multiplier = GO_FAST_LORA_MULTIPLIER if go_fast else 1.0
        if prepared is None:
            prepared = self.prepare(model, targets.components, loras)
        chosen = [
            (lora, weights, lora.scale * multiplier)
            for lora, weights in zip(loras, prepared, strict=True)
            if weights is not None and lora.scale != 0
        ]
        plan: dict[Slot, list[ScaledDelta]] = defaultdict(list)
        for _, weights, scale in chosen:
            for kind, deltas in (("weight", weights.deltas), ("bias", weights.biases)):
                for module, delta in deltas.items():
                    if module.split(".", 1)[0] in parts:
                        slot = self._slot(module, kind, targets, index)
                        plan[slot].append(ScaledDelta(weights.digest, delta, scale))
        groups = [CLIP] * ("text_encoder" in parts) + [targets.group] * ("transformer" in parts)
        started = time.perf_counter()
        self._groups = (CLIP, targets.group)
        try:
            state = self.fuser.apply(plan, groups)
        except UnrepresentableWeight as error:  # apply restored every weight before raising
            raise _overflow_error(error, chosen, index, model) from None
        if state.written:
            log.info(
                "LoRAs now %s on %s: %d weights written in %.3fs",
                [f"{w.digest}x{s:g}" for _, w, s in chosen] or "none",
                targets.group,
                len(state.written),
                time.perf_counter() - started,
            )
        return state

    def _slot(self, module: str, kind: str, targets: LoraTargets, index: ModuleIndex) -> Slot:
        """The one `Slot` of `module`'s weight or bias ("transformer.x"/"text_encoder.y") in what the
        request runs on: the master's own, or the fp8 copy's, made from the master's pristine value."""
        component, bare = module.split(".", 1)
        group = targets.group if component == "transformer" else CLIP
        name = f"{group}:{module}.{kind}"
        if name not in self._slots:
            master = (index.weights if kind == "weight" else index.biases)[module]
            if component == "transformer" and targets.transformer is not targets.master:
                runs = getattr(targets.transformer.get_submodule(bare), kind)
                quantize = targets.quantize if kind == "weight" else None
                self._slots[name] = Slot(name, group, runs, master, quantize, module)
            else:
                self._slots[name] = Slot(name, group, master, module=module)
        return self._slots[name]

    @property
    def fused_modules(self) -> frozenset[str]:
        """The modules ("transformer.x"/"text_encoder.y") holding a LoRA in what the last request ran
        on, read from the fuser's one record."""
        return frozenset(slot.module for slot in self.fuser.fused_slots(self._groups))

    def release(self) -> None:
        """Unfuse everything: every touched weight back to its pristine bytes."""
        self.fuser.restore_all()

    def prepare(
        self, model: str, components: dict[str, nn.Module], loras: Sequence[LoraRequest]
    ) -> list[LoraWeights | None]:
        """Download, check and parse `loras` for `model` without touching any weight (None for a scale
        0 one, never read); safe in many threads at once."""
        return [self.weights(lora, model, components) if lora.scale != 0 else None for lora in loras]

    def weights(self, lora: LoraRequest, model: str, components: dict[str, nn.Module]) -> LoraWeights:
        """The parsed LoRA for `model`: from memory when used recently, else from the cache or the web.
        Its errors are `LoraError`s named for `lora.input_name`, here, once."""
        key = (lora.ref.identity_digest, model)
        with self._guard:
            reading = self._reading.setdefault(key, threading.Lock())
        with reading:
            remembered = self._remembered(key, lora)
            return remembered if remembered is not None else self._read(key, lora, model, components)

    def _remembered(self, key: tuple[str, str], lora: LoraRequest) -> LoraWeights | None:
        """The parsed LoRA kept for `key`, while it may still be trusted to be what `lora` names."""
        with self._guard:
            if key in self._parsed:
                weights, parsed_at = self._parsed[key]
                if not _unversioned(lora.ref) or time.monotonic() - parsed_at < UNVERSIONED_RECHECK_S:
                    self._parsed.move_to_end(key)
                    return weights
        return None

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
        """Keep `weights` parsed, the least recently used others leaving while the total passes the
        budget; one larger than the whole budget serves the request that read it and is not kept."""
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
        """Bytes the parsed LoRAs kept for reuse hold."""
        with self._guard:
            return sum(weights.held_bytes for weights, _ in self._parsed.values())

    def cached_file(self, ref: LoraRef) -> AbstractContextManager[Path]:
        """The ready .safetensors for `ref` in the disk cache, downloaded when absent (`LoraDownloads`)."""
        return self.downloads.cached_file(ref)

    def forget_parsed(self) -> None:
        """Forget every parsed LoRA: each is read and parsed again on its next use (a cold switch)."""
        with self._guard:
            self._parsed.clear()

    def _index(self, model: str, components: dict[str, nn.Module]) -> ModuleIndex:
        with self._guard:
            if model not in self._indexes:
                self._indexes[model] = ModuleIndex(components)
            return self._indexes[model]

    @contextmanager
    def _lora_file(self, ref: LoraRef) -> Iterator[LoraSource]:
        """The LoRA file of `ref` (archives unpacked): a data: URI's bytes, or a path, read-held in the
        disk cache for the block. A cached file the block refuses is discarded, so it is fetched afresh."""
        if ref.kind == "local":  # only the operator's default LoRA is ever local
            yield unpacked(_local_lora(Path(ref.location)), self.settings.max_lora_bytes)
            return
        if ref.kind == "data":
            yield unpacked(decode_data_uri(ref, self.settings.max_lora_bytes), self.settings.max_lora_bytes)
            return
        cached: Path | None = None
        try:
            with self.downloads.cached_file(ref) as cached:
                yield cached
        except LoraError:
            if cached is not None:  # refused once read; the cache's read lock is released by now
                self.downloads.cache.discard(cached)
            raise


def _overflow_error(
    error: UnrepresentableWeight,
    chosen: Sequence[tuple[LoraRequest, LoraWeights, float]],
    index: ModuleIndex,
    model: str,
) -> InputError:
    """The refusal for LoRAs whose sum overflows a weight, naming the inputs and the scales to lower."""
    names = {id(param): name for name, param in (*index.weights.items(), *index.biases.items())}
    module = names.get(id(error.param), "a weight")
    inputs = [lora for lora, weights, _ in chosen if weights.digest in error.orders]
    scales = ", ".join(SCALE_INPUTS.get(lora.input_name, "lora_scale") for lora in inputs)
    limit = torch.finfo(error.param.dtype).max
    return InputError(
        f"{', '.join(lora.input_name for lora in inputs)}: fused into FLUX.1 [{model}], this LoRA pushes "
        f"{module[:80]!r} past the largest value its {str(error.param.dtype).removeprefix('torch.')} "
        f"weights can hold ({limit:.4g}), which would make every image black; lower {scales} or use "
        "another LoRA."
    )


SCALE_INPUTS = {"replicate_weights": "lora_scale", "extra_lora": "extra_lora_scale"}


def _unversioned(ref: LoraRef) -> bool:
    """Whether `ref` names whatever a service currently serves (no version or revision given)."""
    return ref.kind in {"replicate", "huggingface", "civitai"} and not ref.version


def _local_lora(path: Path) -> Path:
    """An operator's LoRA path: a file, or a folder holding one LoRA file (as `cog` passes weights)."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.tar"))
        path = files[0] if len(files) == 1 else path
    if not path.is_file():
        raise LoraError(f"{path} is not a file; point it at a .safetensors LoRA.")
    return path
