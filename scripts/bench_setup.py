"""`benchmark.py setup`: cold start against reading the same weight files, and peak RSS against their bytes.

Each measurement runs in its own Python process, so peak RSS (`ru_maxrss`) belongs to that one thing:
importing the stack; reading every weight file once; `Engine(...)` (the predictor's setup). Files are
read once before timing, so both sides see the same warm page cache. Targets (real weights): setup
≤ 1.3x the read time, and setup's peak RSS above the import-only process ≤ 1.05x the unique bytes,
i.e. no component loaded twice and no float32 copy of a bf16 weight on the way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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
elif mode == "setup":
    Engine(Settings.from_env({**os.environ, "FLUX_DAY_WEIGHTS": root, "FLUX_DAY_OFFLINE": "1",
                              "FLUX_DAY_DEVICE": device, "FLUX_DAY_COMPILE": "0"}))
finished = time.perf_counter()
print(json.dumps({"seconds": finished - imported, "import_s": imported - started,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
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


def child(mode: str, root: Path, device: str, files: list[Path]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(root), device, json.dumps([str(f) for f in files])],
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
    unique = sum(path.stat().st_size for path in files)
    child("read", root, args.device, files)  # warm the page cache for every variant alike
    imports = child("import", root, args.device, files)
    rows = {"import the stack": {**imports, "seconds": imports["import_s"]}}
    rows["read every weight file"] = child("read", root, args.device, files)
    rows["setup: Engine(...)"] = child("setup", root, args.device, files)
    base_rss = rows["import the stack"]["rss"]
    read_s = rows["read every weight file"]["seconds"]
    print(
        f"setup: {len(files)} weight files, {unique / 1e9:.3f} GB unique, device {args.device}, "
        f"weights {root}\n"
        "seconds exclude the import (its own row); RSS above import = peak RSS - the import-only process's"
    )
    print(
        f"{'variant':26} {'seconds':>9} {'vs read':>8} {'peak RSS GB':>12} {'RSS above import / bytes':>25}"
    )
    for name, row in rows.items():
        extra = (row["rss"] - base_rss) / unique if name != "import the stack" else float("nan")
        ratio = row["seconds"] / read_s if read_s else float("nan")
        print(f"{name:26} {row['seconds']:9.3f} {ratio:7.2f}x {row['rss'] / 1e9:12.3f} {extra:24.2f}x")
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
