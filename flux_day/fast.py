"""go_fast: an fp8 copy of each transformer, made with torchao from the loaded one, kept exact under LoRAs.

LoRAs are fused into the full-precision master (flux_day.loras); before an fp8 run, only the layers
whose master changed are quantized again, and layers no longer fused get their original fp8 tensors
back, copied in place (so a compiled graph sees the same tensors, and restores are bit-exact).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Hashable, Mapping

import torch
from torch import nn
from torchao.quantization import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    PerRow,
    quantize_,
)

log = logging.getLogger(__name__)

FP8_TENSOR_CORES = (8, 9)  # Ada and Hopper (L4, L40S, H100, H200) have fp8 matmuls


def fp8_config(device: torch.device) -> Float8DynamicActivationFloat8WeightConfig | Float8WeightOnlyConfig:
    """The torchao recipe for `device`."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_TENSOR_CORES:
        # fp8 weights and per-token dynamic fp8 activations on fp8 tensor cores; per-row weight scales
        # keep FLUX's outlier-heavy rows accurate (per-tensor scaling visibly softens images).
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    # Elsewhere (CPU, pre-Ada GPUs) fp8 storage with weights upcast per matmul: the same path, runnable.
    return Float8WeightOnlyConfig()


def quantized_weight(weight: torch.Tensor, config: object) -> torch.Tensor:
    """`weight` quantized exactly as `quantize_` quantizes a linear layer holding it."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    quantize_(linear, config)
    return linear.weight.detach()


def fp8_copy(master: nn.Module, device: torch.device, config: object) -> nn.Module:
    """An fp8 copy of `master` on `device`, built one layer at a time; `master` is left where it is.

    Peak memory is the fp8 model plus one full-precision layer: copying the whole 24 GB bf16
    transformer first (to the GPU or to CPU RAM) and quantizing it after would need twice that.
    """
    tensors = [*master.parameters(), *master.buffers()]
    fp8 = copy.deepcopy(master, memo={id(t): t for t in tensors})  # the structure; tensors still shared
    with torch.no_grad():
        for module in fp8.modules():
            for key, param in list(module.named_parameters(recurse=False)):
                copied = nn.Parameter(param.detach().to(device, copy=True), requires_grad=False)
                setattr(module, key, copied)
            for key, buffer in list(module.named_buffers(recurse=False)):
                module._buffers[key] = buffer.to(device, copy=True)
            if isinstance(module, nn.Linear):
                quantize_(module, config)  # this layer's full-precision copy is freed here
    return fp8.eval()


def _inner(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain tensors a torchao weight is made of (`qdata`, `scale`), or the weight itself."""
    if hasattr(weight, "__tensor_flatten__"):
        names, _ = weight.__tensor_flatten__()
        return {name: getattr(weight, name) for name in names}
    return {"": weight}


def _copy_bias(fp8_layer: nn.Module, master_layer: nn.Module) -> None:
    """The fp8 layer's bias (full precision, a copy of the master's) made equal to the master's again,
    which LoRA bias updates (`diff_b`) change and restores put back."""
    if getattr(master_layer, "bias", None) is not None:
        fp8_layer.bias.copy_(master_layer.bias.to(fp8_layer.bias.device))


class Fp8Transformers:
    """For each model, an fp8 transformer, and the bookkeeping that keeps it equal to quantize(master)."""

    def __init__(self, masters: Mapping[str, nn.Module], device: torch.device) -> None:
        self.config = fp8_config(device)
        self.masters = dict(masters)
        self.models: dict[str, nn.Module] = {}
        for name, master in self.masters.items():
            started = time.perf_counter()
            self.models[name] = fp8_copy(master, device, self.config)
            log.info(
                "go_fast: %s fp8 transformer (%s) in %.1fs",
                name,
                type(self.config).__name__,
                time.perf_counter() - started,
            )
        self._pristine: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self._requantized: dict[str, set[str]] = {name: set() for name in self.masters}
        self._synced: dict[str, Hashable] = {}

    def sync(self, model: str, fused_modules: set[str], key: Hashable) -> None:
        """Make `model`'s fp8 transformer equal quantize(master) for the `fused_modules` LoRAs changed."""
        if self._synced.get(model) == key and self._requantized[model] == fused_modules:
            return
        self._synced.pop(model, None)
        started, previous = time.perf_counter(), self._requantized[model]
        fp8, master = self.models[model], self.masters[model]
        # Recorded first: a sync interrupted part-way (a cancel) leaves every layer it may have written
        # on the list, and the next sync puts each back.
        self._requantized[model] = previous | fused_modules
        with torch.no_grad():
            for name in previous | fused_modules:
                target = _inner(fp8.get_submodule(name).weight)
                pristine = self._pristine.setdefault(
                    (model, name), {part: tensor.clone() for part, tensor in target.items()}
                )
                if name in fused_modules:
                    # The master may wait in CPU RAM (memory plan); quantize where the fp8 layer lives.
                    weight = master.get_submodule(name).weight.to(next(iter(target.values())).device)
                    fresh = _inner(quantized_weight(weight, self.config))
                    if fresh.keys() != target.keys():  # a layer quantize_ skipped stays in full precision
                        fresh = {"": weight}
                else:
                    fresh = pristine
                for part, tensor in target.items():
                    tensor.copy_(fresh[part])
                _copy_bias(fp8.get_submodule(name), master.get_submodule(name))
        self._requantized[model] = set(fused_modules)
        self._synced[model] = key
        if fused_modules or previous:
            log.info(
                "go_fast: %s fp8 layers re-quantized for the fused LoRAs in %.3fs",
                len(fused_modules),
                time.perf_counter() - started,
            )


SHAPE_BUCKETS_PER_MODEL = 64  # image sizes (each its own static graph) before dynamo falls back to eager


def compile_backend(setting: str, device: torch.device) -> str | None:
    """`FLUX_DAY_COMPILE` as a torch.compile backend, or None for no compilation."""
    if setting == "auto":
        return "inductor" if device.type == "cuda" else None
    if setting in {"", "0", "off", "false", "no"}:
        return None
    if setting in {"1", "on", "true", "yes"}:
        return "inductor"
    known = {"inductor", *torch._dynamo.list_backends(exclude_tags=())}
    if setting not in known:
        raise ValueError(f"FLUX_DAY_COMPILE={setting!r} is not auto, 0, 1 or one of {sorted(known)}")
    return setting


def compile_transformers(transformers: list[nn.Module], backend: str) -> None:
    """Compile each transformer in place, one static graph per image size.

    LoRA fuses and fp8 re-quantization write into the same tensors in place, so a LoRA switch never
    invalidates a compiled graph (tests/test_compile.py counts the graphs).
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, SHAPE_BUCKETS_PER_MODEL)
    for transformer in transformers:
        transformer.compile(backend=backend, dynamic=False)
    log.info(
        "torch.compile (%s) set up for %d transformers; each size compiles on first use",
        backend,
        len(transformers),
    )
