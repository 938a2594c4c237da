"""`benchmark.py setup`: cold start against reading the same weight files, and peak RSS against their bytes.

Each measurement runs in its own Python process, so peak RSS (`ru_maxrss`) belongs to that one thing:
importing the stack; reading every weight file once; `Engine(...)` (the predictor's setup). Files are
read once before timing, so both sides see the same warm page cache. Targets (real weights): setup
≤ 1.3x the read time, and setup's peak RSS above the import-only process ≤ 1.05x the unique bytes,
i.e. no component loaded twice and no float32 copy of a bf16 weight on the way.

On a CPU the weights stay memory-mapped from their files (no dtype to convert), so setup reads
little and the first request faults the pages in: the table also shows the first requests after
setup (a default one, then go_fast, whose fp8 copy is made on first use), and the same after a
restart, when the fp8 copy comes from the disk cache instead of quantizing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, time
mode, root, device = sys.argv[1], sys.argv[2], sys.argv[3]
started = time.perf_counter()
import torch, diffusers, transformers  # noqa: F401  the stack every measurement pays for
from flux_day.engine import Engine
from flux_day.config import Settings
imported = time.perf_counter()
if mode == "read":
    total = 0
    for path in sorted(json.loads(sys.argv[4])):
        with open(path, "rb") as handle:
            total += len(handle.read())
elif mode in ("setup", "restart"):
    engine = Engine(Settings.from_env({**os.environ, "FLUX_DAY_WEIGHTS": root, "FLUX_DAY_OFFLINE": "1",
                                       "FLUX_DAY_DEVICE": device, "FLUX_DAY_COMPILE": "0",
                                       "FLUX_DAY_FP8_CACHE": sys.argv[5]}))
finished = time.perf_counter()
result = {"seconds": finished - imported, "import_s": imported - started,
          "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
if mode in ("setup", "restart"):
    # Every weight read once (a reduction per tensor): what the first request, or a GPU's copy to the
    # device at setup, pays for weights that stay memory-mapped on a CPU.
    begun = time.perf_counter()
    with torch.inference_mode():
        for module in engine.residency.modules.values():
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.float().abs().max() if tensor.numel() else None
    result["touch"] = time.perf_counter() - begun
    result["rss_touched"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # The extra work of the first go_fast request: making the fp8 copy of dev (quantizing it, or
    # reading it from the fp8 cache after a restart).
    begun = time.perf_counter()
    engine.pipeline("dev", "txt2img", fp8=True)
    result["first_fast"] = time.perf_counter() - begun
    engine.fp8_cache.wait()
print(json.dumps(result))
"""

FOLDERS = ("FLUX.1-dev", "FLUX.1-schnell", "safety-checker", "nsfw-classifier")


def weight_files(root: Path) -> list[Path]:
    """Every file setup reads: the layout's folders, without download records or LoRA caches."""
    return [
        path
        for folder in FOLDERS
        for path in sorted((root / folder).rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    ]


def child(mode: str, root: Path, device: str, files: list[Path], fp8_cache: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    arguments = [mode, str(root), device, json.dumps([str(f) for f in files]), str(fp8_cache)]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *arguments],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def setup(args: argparse.Namespace) -> None:
    """Print the cold-start table for the weights under `args.weights`."""
    root = Path(args.weights)
    files = weight_files(root)
    print_setup(measure(root, args.device, files), root, args.device, files)


def measure(root: Path, device: str, files: list[Path]) -> dict[str, dict[str, float]]:
    """Each row's child process: the import alone, reading every file, setup, and setup after a restart
    (the fp8 cache the setup row wrote on disk)."""
    scratch = Path(tempfile.mkdtemp(prefix="flux-day-fp8-cache-"))
    try:
        child("read", root, device, files, scratch)  # warm the page cache for every variant alike
        imports = child("import", root, device, files, scratch)
        rows = {"import the stack": {**imports, "seconds": imports["import_s"]}}
        rows["read every weight file"] = child("read", root, device, files, scratch)
        rows["setup: Engine(...)"] = child("setup", root, device, files, scratch)
        rows["restart (fp8 cache on disk)"] = child("restart", root, device, files, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def print_setup(rows: dict[str, dict[str, float]], root: Path, device: str, files: list[Path]) -> None:
    """The table, the after-setup lines and the targets' verdicts."""
    unique = sum(path.stat().st_size for path in files)
    base_rss = rows["import the stack"]["rss"]
    read_s = rows["read every weight file"]["seconds"]
    print(
        f"setup: {len(files)} weight files, {unique / 1e9:.3f} GB unique, device {device}, "
        f"weights {root}\n"
        "seconds exclude the import (its own row); RSS above import = peak RSS - the import-only process's"
    )
    print(
        f"{'variant':28} {'seconds':>9} {'vs read':>8} {'peak RSS GB':>12} {'RSS above import / bytes':>25}"
    )
    for name, row in rows.items():
        extra = (row["rss"] - base_rss) / unique if name != "import the stack" else float("nan")
        ratio = row["seconds"] / read_s if read_s else float("nan")
        print(f"{name:28} {row['seconds']:9.3f} {ratio:7.2f}x {row['rss'] / 1e9:12.3f} {extra:24.2f}x")
    print(
        "\nafter setup, seconds: reading every weight once (memory-mapped on a CPU: what the first request "
        "pays) and the first go_fast request's extra time (making dev's fp8 copy)"
    )
    for name in ("setup: Engine(...)", "restart (fp8 cache on disk)"):
        row = rows[name]
        total = row["seconds"] + row["touch"]
        touched = (row["rss_touched"] - base_rss) / unique
        print(
            f"  {name:28} touch every weight {row['touch']:6.2f} (setup + touch {total:6.2f} = "
            f"{total / read_s:4.2f}x read; RSS above import then {touched:4.2f}x bytes)   "
            f"first go_fast extra {row['first_fast']:6.2f}"
        )
    setup_row = rows["setup: Engine(...)"]
    time_ok = setup_row["seconds"] <= 1.3 * read_s
    rss_ok = (setup_row["rss"] - base_rss) <= 1.05 * unique
    print(
        f"targets: setup <= 1.3x read: {'met' if time_ok else 'NOT met'}; RSS above import <= 1.05x bytes: "
        f"{'met' if rss_ok else 'NOT met'}"
        + (
            "  (tiny weights: Python and model construction dominate; meaningful on real weights)"
            if unique < 1e8
            else ""
        )
    )
