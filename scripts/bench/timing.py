"""What every benchmark shares: timing calls, printing a table of timings, progress lines, the device."""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

_STARTED = time.perf_counter()


def timed(function: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        function()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return seconds


def print_table(
    title: str,
    rows: list[tuple[str, list[float]]],
    baseline: str,
    unit: str = "s",
    ratio_label: str | None = None,
    extra: tuple[tuple[str, Callable[[float], float]], ...] = (),
    columns: tuple[tuple[str, Mapping[str, str]], ...] = (),
) -> None:
    """Median/min/max of each row in `unit` (s or ms), `extra` columns (header, value from the median
    in seconds), `columns` measured apart (header, text by row name), and its median over the baseline's."""
    factor = {"s": 1, "ms": 1000}[unit]
    base = statistics.median(dict(rows)[baseline])
    width = max(34, *(len(name) for name, _ in rows))
    ratio = ratio_label or f"vs {baseline}"
    extra_header = "".join(f" {header:>{max(9, len(header))}}" for header, _ in (*extra, *columns))
    print(f"\n{title}")
    print(f"{'variant':<{width}} {'median ' + unit:>9} {'min ' + unit:>8} {'max ' + unit:>8}", end="")
    print(f"{extra_header} {ratio:>16}")
    for name, seconds in rows:
        median = statistics.median(seconds)
        low, high = min(seconds) * factor, max(seconds) * factor
        cells = "".join(f" {column(median):>{max(9, len(header))}.1f}" for header, column in extra)
        cells += "".join(f" {texts.get(name, '-'):>{max(9, len(header))}}" for header, texts in columns)
        print(f"{name:<{width}} {median * factor:>9.3f} {low:>8.3f} {high:>8.3f}", end="")
        print(f"{cells} {median / base:>15.3f}x")


def progress(message: str) -> None:
    """A progress line on stderr (compiling FLUX at full size takes minutes of silence otherwise)."""
    print(f"[{time.perf_counter() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def describe_device(device: Any) -> str:
    """The GPU's name and compute capability, or the CPU's model name and torch's thread count."""
    import torch

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (cc {major}.{minor})"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name}, {torch.get_num_threads()} threads"
