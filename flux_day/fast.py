"""go_fast: an fp8 copy of each transformer (torchao), made on first use and kept in a disk cache.

Which copies exist, and when:
- **On first use**, not at setup: a server whose users never ask for go_fast never pays for
  quantizing, and setup costs what reading the weights costs. The copy is built one layer at a
  time on the device it runs on (peak: the fp8 model plus one full-precision layer).
- **In a disk cache** next to the weights (`FLUX_DAY_FP8_CACHE`): once built, a copy is written
  there, so a restarted server reads it (half the bytes of the bf16 master) instead of quantizing
  again. Each file records what it was made from (the master's files by name, size and mtime; the
  torchao version; the recipe; the dtype); a file that does not match is rebuilt, never trusted.
- **At setup** only when compilation is on for fp8 transformers (`FLUX_DAY_COMPILE_MODELS`), since
  compiling needs the module; then from the cache when it has it.

LoRAs reach an fp8 layer as `quantize(master pristine + LoRA)` (`flux_day.loras.fuse`), never by
fusing into the master, which stays as loaded.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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

log = logging.getLogger(__name__)

FP8_TENSOR_CORES = (8, 9)  # Ada and Hopper (L4, L40S, H100, H200) have fp8 matmuls
STALE_PARTIAL_S = 3600  # a cache file still being written after this long was abandoned by its writer


@dataclass(frozen=True)
class Recipe:
    """What a device computes in: every model's dtype, and go_fast's torchao config.

    The engine picks one for its device (`Recipe.for_device`); tests hand the engine `PRODUCTION` on
    the CPU, so the suite runs the numerics an H100 runs (torch runs row-wise `_scaled_mm` there).
    """

    dtype: torch.dtype
    fp8: Float8DynamicActivationFloat8WeightConfig | Float8WeightOnlyConfig

    @classmethod
    def for_device(cls, device: torch.device) -> Recipe:
        """bf16 and fp8 matmuls on fp8 tensor cores; bf16 and fp8 storage on older GPUs; float32 and
        fp8 storage on the CPU (bf16 matmuls are slow there)."""
        if device.type != "cuda":
            return WEIGHT_ONLY
        if torch.cuda.get_device_capability(device) >= FP8_TENSOR_CORES:
            return PRODUCTION
        return Recipe(torch.bfloat16, WEIGHT_ONLY.fp8)


# torchao's configs would otherwise set inductor's global options on every `quantize_` (the fp8 build
# and each go_fast LoRA fuse): compiles would depend on whether this process has quantized yet.
# `flux_day.compile` sets inductor's options, once.
PRODUCTION: Final = Recipe(
    torch.bfloat16,
    # fp8 weights and per-token dynamic fp8 activations on fp8 tensor cores; per-row weight scales
    # keep FLUX's outlier-heavy rows accurate (per-tensor scaling visibly softens images).
    Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False),
)
# Elsewhere fp8 storage with weights upcast per matmul: the same path, runnable on any device.
WEIGHT_ONLY: Final = Recipe(torch.float32, Float8WeightOnlyConfig(set_inductor_config=False))


class _WeightSlot(nn.Module):
    """Holds one tensor as `weight`, so torchao's own `quantize_` handler quantizes exactly that tensor
    (the same code path as a whole model) with no layer built or initialised around it."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)


def _every_module(module: nn.Module, fqn: str) -> bool:
    return True


def quantized_weight(weight: torch.Tensor, config: object) -> torch.Tensor:
    """`weight` quantized exactly as `quantize_` quantizes a linear layer holding it (the weight is
    returned unchanged where torchao skips a shape)."""
    slot = _WeightSlot(weight.detach())
    quantize_(slot, config, filter_fn=_every_module)
    return slot.weight.detach()


def fp8_bytes(master: nn.Module) -> int:
    """What the fp8 copy of `master` will hold, before it exists (the memory plan needs it at setup):
    one byte per linear weight element plus a float32 scale per row; everything else as in `master`."""
    total = 0
    for module in master.modules():
        for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if isinstance(module, nn.Linear) and key == "weight":
                total += tensor.numel() + tensor.shape[0] * 4
            else:
                total += tensor.numel() * tensor.element_size()
    return total


def _structure(master: nn.Module) -> nn.Module:
    """A structural copy of `master` whose tensors are still `master`'s (replaced one by one after).

    It holds none of `master`'s compiled blocks: torch drops a module's compiled call
    (`nn.Module.compile`, what `flux_day.compile` uses) when the module is copied, so the copy runs its
    own blocks. (A compiled forward kept on the instance would be copied as the master's own, and the
    copy would run the master: tests/test_compile.py checks the go_fast image.)"""
    tensors = [*master.parameters(), *master.buffers()]
    return copy.deepcopy(master, memo={id(t): t for t in tensors})


def fp8_copy(
    master: nn.Module,
    device: torch.device,
    config: object,
    cached: Mapping[str, torch.Tensor] | None = None,
    weight_of: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.detach,
) -> nn.Module:
    """An fp8 copy of `master` on `device`, built one layer at a time; `master` is left where it is.

    Linear weights come from `cached` (a state dict read from the disk cache) when given, else from
    quantizing the master's pristine value (`weight_of`: a LoRA may be fused into the master now).
    Peak memory is the fp8 model plus one full-precision layer: copying the whole 24 GB bf16
    transformer first and quantizing it after would need twice that.
    """
    fp8 = _structure(master)
    with torch.no_grad():
        for name, module in fp8.named_modules():
            for key, param in list(module.named_parameters(recurse=False)):
                full_key = f"{name}.{key}" if name else key
                if isinstance(module, nn.Linear) and key == "weight":
                    value = (
                        cached[full_key].to(device)
                        if cached is not None
                        else quantized_weight(weight_of(param).to(device), config)
                    )
                else:  # biases and norms: their pristine values too (a `diff_b` may be fused now)
                    value = weight_of(param).to(device, copy=True)
                setattr(module, key, nn.Parameter(value, requires_grad=False))
            for key, buffer in list(module.named_buffers(recurse=False)):
                setattr(module, key, buffer.to(device, copy=True))
    return fp8.eval()


class Fp8Cache:
    """fp8 copies on disk, one safetensors file per model in torchao's own flattened format.

    Files are written under a unique temporary name and renamed into place, so a reader sees a whole
    file or none, and replicas sharing the folder may write the same copy at once (the last rename
    wins; both wrote the same bytes). A folder that cannot be written is only read.
    """

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def path(self, model: str) -> Path | None:
        return None if self.root is None else self.root / f"{model}.safetensors"

    def load(self, model: str, fingerprint: str) -> dict[str, torch.Tensor] | None:
        """The cached linear weights of `model`, or None when absent or made from something else."""
        path = self.path(model)
        if path is None or not path.is_file():
            return None
        try:
            with safetensors.safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("flux_day_fingerprint") != fingerprint:
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

    def save(self, model: str, fp8: nn.Module, fingerprint: str) -> threading.Thread | None:
        """Write `fp8`'s linear weights in the background (copied first, so later LoRA fuses into
        `fp8` cannot reach the file); returns the writer thread, or None when there is no cache."""
        path = self.path(model)
        if path is None:
            return None
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
        metadata["tensor_names"] = json.dumps(list(weights))
        metadata["flux_day_fingerprint"] = fingerprint

        def write() -> None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._sweep(path.parent)
                partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
                safetensors.torch.save_file(tensors, partial, metadata=metadata)
                os.replace(partial, path)
                log.info("go_fast: fp8 copy of %s cached at %s", model, path)
            except OSError as error:
                log.warning("go_fast: the fp8 copy of %s is not cached (%s)", model, error.strerror)

        writer = threading.Thread(target=write, name=f"fp8-cache-{model}", daemon=True)
        writer.start()
        return writer

    @staticmethod
    def _sweep(folder: Path) -> None:
        """Remove partial files their writers abandoned (a writer renames its own within minutes)."""
        for partial in folder.glob(".*.partial"):
            try:
                if time.time() - partial.stat().st_mtime > STALE_PARTIAL_S:
                    partial.unlink()
            except OSError:
                pass


def fingerprint(files: Sequence[Path], config: object, dtype: torch.dtype) -> str:
    """What an fp8 copy depends on: the master's weight files, torchao, the recipe and the dtype."""
    facts = [f"torchao={torchao.__version__}", f"config={config!r}", f"dtype={dtype}"]
    for path in sorted(files):
        stat = path.stat()
        facts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(facts).encode()).hexdigest()[:32]


class Fp8Transformers:
    """For each model, its fp8 transformer, made on first use (from the disk cache when it has it)."""

    def __init__(
        self,
        masters: Mapping[str, nn.Module],
        device: torch.device,
        config: object,
        cache: Fp8Cache | None = None,
        sources: Mapping[str, Sequence[Path]] | None = None,
    ) -> None:
        self.config = config
        self.device = device
        self.masters = dict(masters)
        self.cache = cache or Fp8Cache(None)
        self.sources = dict(sources or {})
        self.writers: list[threading.Thread] = []

    def expected_bytes(self, model: str) -> int:
        return fp8_bytes(self.masters[model])

    def build(
        self,
        model: str,
        device: torch.device | None = None,
        weight_of: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.detach,
    ) -> nn.Module:
        """`model`'s fp8 transformer on `device` (default: the engine's): read from the disk cache
        when it holds a copy made from these weights, else quantized from the pristine master and
        then cached. `weight_of` gives a master weight's pristine value (a full-precision request's
        LoRA may be fused into the master). The residency calls it once per model and keeps the result."""
        device = device or self.device
        started = time.perf_counter()
        stamp = self._fingerprint(model)
        cached = self.cache.load(model, stamp) if stamp else None
        fp8 = fp8_copy(self.masters[model], device, self.config, cached, weight_of)
        log.info(
            "go_fast: %s fp8 transformer (%s) %s in %.1fs",
            model,
            type(self.config).__name__,
            "read from the fp8 cache" if cached is not None else "quantized",
            time.perf_counter() - started,
        )
        if cached is None and stamp:
            writer = self.cache.save(model, fp8, stamp)
            if writer is not None:
                self.writers.append(writer)
        return fp8

    def _fingerprint(self, model: str) -> str | None:
        files = self.sources.get(model)
        if not files:
            return None
        dtype = next(self.masters[model].parameters()).dtype
        return fingerprint(files, self.config, dtype)

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """A fused full-precision weight as the fp8 layer holds it (what LoRA fuses write)."""
        return quantized_weight(weight, self.config)

    def wait_for_cache(self) -> None:
        """Block until every cache file under way is written (tests and benchmarks)."""
        for writer in self.writers:
            writer.join()
        self.writers.clear()
