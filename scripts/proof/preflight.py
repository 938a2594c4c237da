"""The GPU proof's preflight: every check that needs no clock, in seconds, before the timed run.

`python scripts/gpu_proof.py --preflight` prints one line per check and exits non-zero naming what
failed: Python, torch (>= 2.11, with CUDA and an fp8 device for the production recipe), the pinned
diffusers, transformers' major release, torchao with its fp8 configs, the small packages, every
module the proof imports (`PROOF_MODULES`: everything `flux_day.engine` reaches comes with it), free
GPU memory for FLUX.1 at its real size, host memory for the 80 GB phase's home copies, and disk.
Versions come from pyproject.toml, the pins, not from a second list here.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import shutil
import sys
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30
# The device has torch 2.11; torchao 0.18's own check loads its extensions from 2.11 on (README).
MIN_TORCH = (2, 11)
# Everything the proof imports, its phases' lazy imports included: the run checks at its end that
# nothing else of the project was imported (`late_imports`).
PROOF_MODULES = (
    "scripts.proof.speed",
    "scripts.proof.h100",
    "flux_day.engine",
    "scripts.random_weights.models",
    "scripts.bench.memory_model",
    "flux_day.loras.delta_math",
    "scripts.bench.lora_switch",
    "tests.harness.lora_files",
    "PIL.Image",
    "numpy",
)
PROJECT_PACKAGES = ("flux_day", "scripts", "tests")
SMALL_PACKAGES = {"huggingface_hub": "huggingface_hub", "safetensors": "safetensors", "PIL": "pillow"}
DISK_NEEDED = 10 * GIB  # inductor's caches and kernels for two transformers, the images


class CheckFailed(Exception):
    """A check that failed, with the sentence that says what to do."""


@dataclass(frozen=True)
class Check:
    """One named check."""

    name: str
    run: Callable[[], str]  # returns what it found; raises CheckFailed


def pins(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """`name -> version` of every `name==version` dependency of flux-day (pyproject.toml)."""
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return {m[1].lower(): m[2] for d in dependencies if (m := re.fullmatch(r"([\w.-]+)==([\w.]+)", d))}


def release(version: str) -> tuple[int, ...]:
    """(2, 11, 0) from "2.11.0+cu130"."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def imported(name: str) -> object:
    """The module `name`, or a `CheckFailed` naming the package that is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        missing = getattr(error, "name", None) or name
        raise CheckFailed(
            f"cannot import {name} ({missing} is missing: {error}); install it (README, GPU proof: "
            f"scripts/gpu_proof_wheels.sh writes the wheels)"
        ) from None


def python_check() -> str:
    """Python at least pyproject's `requires-python`."""
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    if sys.version_info[:2] < release(wanted.removeprefix(">=")):
        raise CheckFailed(f"Python {sys.version.split()[0]}; flux-day needs {wanted}")
    return f"{sys.version.split()[0]} ({wanted})"


def torch_check(cuda: bool) -> str:
    """torch >= 2.11; for the full-size proof with a CUDA device."""
    torch = imported("torch")
    found = f"{torch.__version__}"
    if release(torch.__version__)[:2] < MIN_TORCH:
        raise CheckFailed(f"torch {found}; the proof needs >= {'.'.join(map(str, MIN_TORCH))}")
    if not cuda:
        return f"{found} (CPU run: CUDA not needed)"
    if not torch.cuda.is_available():
        raise CheckFailed(f"torch {found} sees no CUDA device; the full-size proof needs one (--tiny: CPU)")
    return f"{found}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}"


def pinned_check(package: str, same_major: bool = False) -> Callable[[], str]:
    """`package` at flux-day's pin (or, `same_major`, at least its pinned major release)."""

    def check() -> str:
        version = imported(package).__version__
        pin = pins()[package]
        ok = release(version)[0] >= release(pin)[0] if same_major else version == pin
        wanted = f">= {release(pin)[0]} (pinned {pin})" if same_major else f"== {pin}"
        if not ok:
            raise CheckFailed(f"{package} {version}; flux-day needs {wanted}")
        return f"{version} ({wanted})"

    return check


def torchao_check() -> str:
    """torchao with the fp8 configs go_fast's recipes use."""
    torchao = imported("torchao")
    quantization = imported("torchao.quantization")
    names = ("Float8DynamicActivationFloat8WeightConfig", "Float8WeightOnlyConfig", "PerRow", "quantize_")
    missing = [name for name in names if not hasattr(quantization, name)]
    if missing:
        raise CheckFailed(
            f"torchao {torchao.__version__} lacks {', '.join(missing)}; install {pins()['torchao']}"
        )
    return f"{torchao.__version__} (pinned {pins()['torchao']}), fp8 configs present"


def small_packages_check() -> str:
    """The packages flux-day imports beyond torch, transformers, diffusers and torchao."""
    found = []
    for module, package in SMALL_PACKAGES.items():
        found.append(f"{package} {getattr(imported(module), '__version__', '?')}")
    requests = imported("requests")
    return ", ".join([*found, f"requests {requests.__version__}"])


def project_check() -> str:
    """Every module the proof imports, and with them everything `flux_day.engine` reaches."""
    for name in PROOF_MODULES:
        imported(name)
    loaded = [name for name in sys.modules if name.split(".")[0] == "flux_day"]
    return f"{len(PROOF_MODULES)} entry modules, {len(loaded)} flux_day modules imported"


def _cuda() -> object:
    torch = imported("torch")
    if not torch.cuda.is_available():
        raise CheckFailed("no CUDA device (see torch above)")
    return torch


def fp8_check() -> str:
    """An sm89+ device, where the engine picks the production recipe (bf16, dynamic fp8)."""
    torch = _cuda()

    from flux_day.fp8 import FP8_TENSOR_CORES, PRODUCTION, Recipe

    capability = torch.cuda.get_device_capability(0)
    if capability < FP8_TENSOR_CORES or Recipe.for_device(torch.device("cuda")) is not PRODUCTION:
        raise CheckFailed(
            f"sm{capability[0]}{capability[1]} has no fp8 tensor cores; go_fast's production recipe needs "
            f"sm{FP8_TENSOR_CORES[0]}{FP8_TENSOR_CORES[1]}+ (L4, L40S, H100, H200)"
        )
    return f"sm{capability[0]}{capability[1]}: {PRODUCTION.name}"


@functools.cache
def full_size_bytes() -> dict[str, int]:
    """Every component of FLUX.1 at its real size, from models on the meta device (seconds)."""
    from scripts.bench.plan import full_size_components

    return full_size_components()


def gpu_memory_check() -> str:
    """Everything resident at FLUX.1's real size (both transformers, both fp8 copies) plus the reserve."""
    from flux_day.memory_plan import DEFAULT_RESERVE

    torch = _cuda()

    needed = sum(full_size_bytes().values()) + DEFAULT_RESERVE
    free, total = torch.cuda.mem_get_info(0)
    if free < needed:
        raise CheckFailed(
            f"{free / GIB:.1f} GiB free of {total / GIB:.1f}; the proof needs {needed / GIB:.1f} GiB "
            "(every component of FLUX.1 resident + the activation reserve); free the GPU"
        )
    return f"{free / GIB:.1f} GiB free of {total / GIB:.1f}, needs {needed / GIB:.1f}"


def host_memory_check(cuda: bool) -> str:
    """The 80 GB phase keeps schnell's transformers in pinned host memory (x1.05: the residency packs
    them into power-of-two chunks, `memory_plan.pinned_layout`, about 2% over their bytes)."""
    needed = 1.05 * sum(full_size_bytes()[name] for name in ("schnell-full", "schnell-fp8")) if cuda else GIB
    available = _mem_available()
    if available is not None and available < needed:
        raise CheckFailed(f"{available / GIB:.1f} GiB host memory available; needs {needed / GIB:.1f}")
    return f"{'?' if available is None else f'{available / GIB:.1f}'} GiB available, needs {needed / GIB:.1f}"


def _mem_available() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(match[1]) * 1024 if match else None


def disk_check(out: Path | None) -> str:
    """Room for inductor's caches in the temporary folder, and `out` writable."""
    where = [Path(tempfile.gettempdir()), *([out] if out is not None else [])]
    for folder in where:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise CheckFailed(f"{folder} is not writable")
    free = shutil.disk_usage(where[0]).free
    if free < DISK_NEEDED:
        raise CheckFailed(f"{free / GIB:.1f} GiB free in {where[0]}; needs {DISK_NEEDED / GIB:.0f}")
    return f"{free / GIB:.0f} GiB free in {where[0]}" + (f", {out} writable" if out else "")


def checks(cuda: bool, out: Path | None) -> list[Check]:
    """The checks in order: a later one may rely on an earlier one's import."""
    found = [
        Check("python", python_check),
        Check("torch", lambda: torch_check(cuda)),
        Check("transformers", pinned_check("transformers", same_major=True)),
        Check("diffusers", pinned_check("diffusers")),
        Check("torchao", torchao_check),
        Check("packages", small_packages_check),
        Check("modules", project_check),
    ]
    if cuda:
        found += [Check("fp8 device", fp8_check), Check("GPU memory", gpu_memory_check)]
    return [
        *found,
        Check("host memory", lambda: host_memory_check(cuda)),
        Check("disk", lambda: disk_check(out)),
    ]


def preflight(cuda: bool, out: Path | None = None, say: Callable[[str], None] = print) -> list[str]:
    """Run every check, saying one line each; returns the failures' lines (empty: all passed)."""
    failures: list[str] = []
    for check in checks(cuda, out):
        try:
            line = f"preflight {check.name:<12} ok    {check.run()}"
        except CheckFailed as error:
            line = f"preflight {check.name:<12} FAIL  {error}"
        except Exception as error:  # a check broken by an earlier failure still says what it met
            line = f"preflight {check.name:<12} FAIL  {type(error).__name__}: {error}"
        if " FAIL " in line:
            failures.append(line)
        say(line)
    return failures


def late_imports(before: set[str]) -> list[str]:
    """Project modules imported since `before` (sys.modules' names then): what the preflight missed."""
    return sorted(n for n in sys.modules if n.split(".")[0] in PROJECT_PACKAGES and n not in before)
