"""`LoraManager`: a request's LoRA choices → fetched, parsed and exactly fused weights.

Parsed LoRAs are kept in a small in-memory LRU keyed by reference and model, so asking again for a
LoRA just used costs only the fuse; asking for exactly the LoRAs already fused costs nothing.
Everything that can fail (download, parse, fit) happens before any weight is touched.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from flux_day.config import Settings
from flux_day.errors import InputError
from flux_day.loras.fetch import fetch_bytes
from flux_day.loras.flux_layout import ModuleIndex
from flux_day.loras.formats import LoraWeights, read_lora
from flux_day.loras.fuse import ScaledDelta, WeightFuser
from flux_day.loras.refs import parse_ref, shown_source

log = logging.getLogger(__name__)

GO_FAST_LORA_MULTIPLIER = 1.5  # the schema's lora_scale description promises it
PARSED_LORAS_KEPT = 4


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA to fuse: the input it came from (for errors), the reference, and the scale."""

    input_name: str
    source: str
    scale: float


class LoraManager:
    """Fetches, parses and fuses LoRAs into the weights of whichever model a request uses."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.fuser = WeightFuser()
        self._parsed: OrderedDict[tuple[str, str], LoraWeights] = OrderedDict()
        self._indexes: dict[str, ModuleIndex] = {}

    def activate(
        self,
        model: str,
        components: dict[str, nn.Module],
        loras: Sequence[LoraRequest],
        go_fast: bool = False,
    ) -> None:
        """Fuse exactly `loras` (scale 0 ones skipped) into `components`; restore everything else."""
        index = self._index(model, components)
        multiplier = GO_FAST_LORA_MULTIPLIER if go_fast else 1.0
        chosen = [
            (self.weights(lora, model, components), lora.scale * multiplier)
            for lora in loras
            if lora.scale != 0
        ]
        plan: dict[nn.Parameter, list[ScaledDelta]] = defaultdict(list)
        for weights, scale in chosen:
            for module, delta in weights.deltas.items():
                plan[index.weights[module]].append(ScaledDelta(weights.digest, delta, scale))
        key = (model, tuple(sorted((weights.digest, scale) for weights, scale in chosen)))
        started = time.perf_counter()
        if self.fuser.apply(plan, key) and (plan or chosen):
            log.info(
                "LoRAs now %s on %s: %d weights fused in %.3fs",
                [f"{w.digest}x{s:g}" for w, s in chosen] or "none",
                model,
                len(plan),
                time.perf_counter() - started,
            )

    def weights(self, lora: LoraRequest, model: str, components: dict[str, nn.Module]) -> LoraWeights:
        """The parsed LoRA for `model`, from memory when it was used recently."""
        key = (hashlib.sha256(lora.source.encode()).hexdigest(), model)
        if key in self._parsed:
            self._parsed.move_to_end(key)
            return self._parsed[key]
        started = time.perf_counter()
        data = self._read(lora)
        weights = read_lora(data, lora.input_name, self._index(model, components), f"FLUX.1 [{model}]")
        log.info(
            "read %s LoRA %s for %s: %d bytes, %d target weights, in %.2fs",
            weights.layout,
            shown_source(lora.source),
            lora.input_name,
            len(data),
            len(weights.deltas),
            time.perf_counter() - started,
        )
        self._parsed[key] = weights
        while len(self._parsed) > PARSED_LORAS_KEPT:
            self._parsed.popitem(last=False)
        return weights

    def _index(self, model: str, components: dict[str, nn.Module]) -> ModuleIndex:
        if model not in self._indexes:
            self._indexes[model] = ModuleIndex(components)
        return self._indexes[model]

    def _read(self, lora: LoraRequest) -> bytes:
        # A local file is accepted only from the operator (COG_WEIGHTS), never from a request input.
        if lora.input_name == DEFAULT_LORA_INPUT and not lora.source.startswith(("data:", "http:", "https:")):
            path = Path(lora.source)
            if path.is_dir():  # a weights folder holding one LoRA file, as `cog` passes it
                files = sorted(path.glob("*.safetensors"))
                path = files[0] if len(files) == 1 else path
            if not path.is_file():
                raise InputError(
                    f"{DEFAULT_LORA_INPUT}: {path} is not a file; point it at a .safetensors LoRA."
                )
            return path.read_bytes()
        return fetch_bytes(parse_ref(lora.input_name, lora.source), self.settings)


DEFAULT_LORA_INPUT = "COG_WEIGHTS"
