"""go_fast's fp8 transformers (torchao): quantized on first use, layer by layer, kept in a disk cache.

A restarted server reads the copy from `FLUX_DAY_FP8_CACHE` when the file records the same master files,
torchao version, recipe and dtype. LoRAs reach an fp8 layer as `quantize(master pristine + LoRA)`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import safetensors.torch
import torch
import torchao
from torch import nn
from torchao.prototype.safetensors.safetensors_support import (
    flatten_tensor_state_dict,
    unflatten_tensor_state_dict,
)
from torchao.quantization import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    PerRow,
    quantize_,
)

from flux_day import filelocks

log = logging.getLogger(__name__)

FP8_TENSOR_CORES = (8, 9)  # Ada and Hopper (L4, L40S, H100, H200) have fp8 matmuls


@dataclass(frozen=True)
class Recipe:
    """A device's model dtype and go_fast's torchao config (tests run `PRODUCTION` on the CPU)."""

    dtype: torch.dtype
    fp8: Float8DynamicActivationFloat8WeightConfig | Float8WeightOnlyConfig

    @classmethod
    def for_device(cls, device: torch.device) -> Recipe:
        """fp8 matmuls on fp8 tensor cores, else fp8 storage; float32 on the CPU (bf16 matmuls are slow)."""
        if device.type != "cuda":
            return WEIGHT_ONLY
        if torch.cuda.get_device_capability(device) >= FP8_TENSOR_CORES:
            return PRODUCTION
        return Recipe(torch.bfloat16, WEIGHT_ONLY.fp8)

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        return quantized_weight(weight, self.fp8)


# `set_inductor_config=False`: torchao would otherwise set inductor's global options on every
# `quantize_`; `flux_day.compile` passes its own per compile.
PRODUCTION: Final = Recipe(
    torch.bfloat16,
    # Per-token dynamic fp8 activations; per-row weight scales keep FLUX's outlier-heavy rows accurate.
    Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False),
)
# fp8 storage with weights upcast per matmul: the same path, runnable on any device.
WEIGHT_ONLY: Final = Recipe(torch.float32, Float8WeightOnlyConfig(set_inductor_config=False))


def quantized_weight(weight: torch.Tensor, config: object) -> torch.Tensor:
    """`weight` quantized exactly as `quantize_` quantizes a linear holding it."""
    slot = nn.Module()  # holds just this tensor, as a linear holds its weight: no layer built around it
    slot.weight = nn.Parameter(weight.detach(), requires_grad=False)
    quantize_(slot, config, filter_fn=lambda module, fqn: True)
    return slot.weight.detach()


def fp8_bytes(master: nn.Module) -> int:
    """Bytes of `master`'s fp8 copy before it exists: linear weights one byte each plus a float32 scale
    per row; the rest as in `master`."""
    linear = {id(m.weight) for m in master.modules() if isinstance(m, nn.Linear)}
    tensors = [*master.parameters(), *master.buffers()]
    return sum(
        t.numel() + t.shape[0] * 4 if id(t) in linear else t.numel() * t.element_size() for t in tensors
    )


def fingerprint(files: Sequence[Path], config: object, dtype: torch.dtype) -> str:
    facts = [f"torchao={torchao.__version__}", f"config={config!r}", f"dtype={dtype}"]
    facts += [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(files)]
    return hashlib.sha256("\n".join(facts).encode()).hexdigest()[:32]


class Fp8Cache:
    """fp8 copies on disk, one safetensors file per model in torchao's flattened format, published as
    the other caches are (`filelocks.publish`); a folder that cannot be written is only read."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.writers: list[threading.Thread] = []

    @staticmethod
    def _stamp(path: Path) -> str | None:
        try:
            with safetensors.safe_open(path, framework="pt") as handle:
                return (handle.metadata() or {}).get("flux_day_fingerprint")
        except Exception:  # absent, damaged or foreign: to be written again
            return None

    def load(self, model: str, stamp: str) -> dict[str, torch.Tensor] | None:
        path = None if self.root is None else self.root / f"{model}.safetensors"
        if path is None or not path.is_file():
            return None
        try:
            with safetensors.safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("flux_day_fingerprint") != stamp:
                    log.info("go_fast: the fp8 cache of %s was made from other weights; rebuilding", model)
                    return None
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            weights, leftover = unflatten_tensor_state_dict(tensors, metadata)
        except Exception as error:  # a damaged or foreign file is rebuilt, never trusted
            log.warning(
                "go_fast: the fp8 cache of %s cannot be read (%s); rebuilding", model, type(error).__name__
            )
            return None
        return weights if not leftover else None

    def save(self, model: str, fp8: nn.Module, stamp: str) -> None:
        """Write `fp8`'s linear weights in the background, copied first (later LoRA fuses stay out)."""
        if self.root is None:
            return
        path = self.root / f"{model}.safetensors"
        weights = {
            f"{name}.weight": module.weight.detach()
            for name, module in fp8.named_modules()
            if isinstance(module, nn.Linear) and hasattr(module.weight, "__tensor_flatten__")
        }
        tensors: dict[str, torch.Tensor] = {}
        metadata: dict[str, str] = {}
        for key, weight in weights.items():  # one layer at a time: the copy is the only extra memory
            layer_tensors, layer_metadata = flatten_tensor_state_dict({key: weight.to("cpu")})
            tensors |= {k: v.contiguous() for k, v in layer_tensors.items()}
            metadata |= {k: v for k, v in layer_metadata.items() if k != "tensor_names"}
        metadata |= {"tensor_names": json.dumps(list(weights)), "flux_day_fingerprint": stamp}

        def write() -> None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                filelocks.remove_abandoned(path.parent)
                # Another replica writing the same copy is left to it (wait=False).
                wrote = filelocks.publish(
                    path,
                    lambda partial: safetensors.torch.save_file(tensors, partial, metadata=metadata),
                    missing=lambda: self._stamp(path) != stamp,
                    wait=False,
                )
                if wrote:
                    log.info("go_fast: fp8 copy of %s cached at %s", model, path)
            except OSError as error:
                log.warning("go_fast: the fp8 copy of %s is not cached (%s)", model, error.strerror)

        self.writers.append(threading.Thread(target=write, name=f"fp8-cache-{model}", daemon=True))
        self.writers[-1].start()

    def wait(self) -> None:
        while self.writers:
            self.writers.pop().join()


def fp8_transformer(
    model: str,
    master: nn.Module,
    device: torch.device,
    recipe: Recipe,
    cache: Fp8Cache,
    files: Sequence[Path] = (),
    weight_of: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.detach,
) -> nn.Module:
    """`model`'s fp8 transformer on `device`, layer by layer (peak: fp8 model plus one layer), from `cache`
    or quantized from the master's pristine values (`weight_of`: a LoRA may be fused into it now)."""
    started = time.perf_counter()
    stamp = fingerprint(files, recipe.fp8, next(master.parameters()).dtype) if files else None
    cached = cache.load(model, stamp) if stamp else None
    fp8 = copy.deepcopy(master, memo={id(t): t for t in [*master.parameters(), *master.buffers()]})
    with torch.no_grad():
        for name, module in fp8.named_modules():
            for key, param in list(module.named_parameters(recurse=False)):
                if not isinstance(module, nn.Linear) or key != "weight":  # biases, norms: pristine values too
                    value = weight_of(param).to(device, copy=True)
                elif cached is not None:
                    value = cached[f"{name}.{key}" if name else key].to(device)
                else:
                    value = quantized_weight(weight_of(param).to(device), recipe.fp8)
                setattr(module, key, nn.Parameter(value, requires_grad=False))
            for key, buffer in list(module.named_buffers(recurse=False)):
                setattr(module, key, buffer.to(device, copy=True))
    how = "read from the fp8 cache" if cached is not None else "quantized"
    took = time.perf_counter() - started
    log.info("go_fast: %s fp8 transformer (%s) %s in %.1fs", model, type(recipe.fp8).__name__, how, took)
    if cached is None and stamp:
        cache.save(model, fp8, stamp)
    return fp8.eval()
