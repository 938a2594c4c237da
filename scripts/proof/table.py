"""`Proof`: the rows of the one table, written after every phase, and the time budget phases share.

A phase runs only if its estimate (from what earlier phases measured) fits in the time left, and is
cut off (SIGINT to the main thread, so even a compile stops) at its own limit or when the budget ends,
leaving a row that says so: a run that meets its limit always leaves its table.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

GIB = 2**30
MARGIN_S = 5.0  # kept at the end of the budget for printing and writing the table


class CutOff(Exception):
    """A phase stopped at its time limit."""


@contextmanager
def limited(seconds: float, what: str = "its limit") -> Iterator[None]:
    """Raise `CutOff` in the main thread after `seconds` (a real signal, so a blocking compile stops)."""
    main, lock, fired, active = threading.main_thread().ident, threading.Lock(), threading.Event(), [True]

    def fire() -> None:
        with lock:
            if active[0]:
                fired.set()
                signal.pthread_kill(main, signal.SIGINT)

    timer = threading.Timer(max(0.0, seconds), fire)
    timer.daemon = True
    timer.start()
    try:
        try:
            yield
        finally:
            with lock:
                active[0] = False
            timer.cancel()
    except KeyboardInterrupt:
        if not fired.is_set():
            raise  # a person's Ctrl-C
        raise CutOff(f"cut off at {what}, after {seconds:.0f}s") from None


class Proof:
    """The rows of the one table, the time budget, and peak GPU memory per phase."""

    def __init__(self, budget: float, cuda: bool, out: Path | None = None) -> None:
        self.started = time.perf_counter()
        self.budget = budget
        self.cuda = cuda
        self.out = out
        self.rows: list[dict[str, str]] = []

    def save(self) -> None:
        """Write the table so far to `out`: a run cut off by its time limit still leaves its rows."""
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "gpu_proof.json").write_text(json.dumps(self.rows, indent=1))
            (self.out / "gpu_proof.txt").write_text(self.table() + "\n")

    def left(self) -> float:
        """Seconds left of the budget."""
        return self.budget - (time.perf_counter() - self.started)

    def log(self, message: str) -> None:
        """A progress line on stderr, with the seconds since the start."""
        print(f"[{time.perf_counter() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def row(self, phase: str, what: str, value: str, note: str = "") -> None:
        """Add a row to the table (and say it on stderr)."""
        self.rows.append({"phase": phase, "what": what, "value": value, "note": note})
        self.log(f"{phase}: {what} = {value} {note}")

    def phase(self, name: str, needs: float, run: Callable[[], None], limit: float | None = None) -> bool:
        """Run one phase if its estimate `needs` fits in the time left, stopping it at `limit` seconds
        or the budget's end; record its peak GPU memory. True if it ran to its end."""
        if self.left() - MARGIN_S < needs:
            self.row(name, "skipped", "-", f"time budget: {self.left():.0f}s left, needs ~{needs:.0f}s")
            self.save()
            return False
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        begun = time.perf_counter()
        budget_end = self.left() - MARGIN_S
        own = limit is not None and limit < budget_end
        done = False
        try:
            with limited(limit if own else budget_end, "its limit" if own else "the budget's end"):
                run()
            done = True
        except CutOff as error:
            self.row(
                name, "cut off", f"{time.perf_counter() - begun:.0f} s", f"{error} (estimate {needs:.0f}s)"
            )
        except Exception as error:  # the proof reports what broke and goes on to the next phase
            first = str(error).splitlines()[0][:160] if str(error) else ""
            self.row(name, "FAILED", type(error).__name__, first)
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() / GIB
            self.row(
                name, "peak GPU memory", f"{peak:.1f} GiB", f"phase took {time.perf_counter() - begun:.0f}s"
            )
        self.save()
        return done

    def table(self) -> str:
        """The rows as one aligned table, header first."""
        keys = ("phase", "what", "value")
        width = {key: max(len(key), *(len(row[key]) for row in self.rows)) for key in keys}

        def line(row: dict[str, str]) -> str:
            left = f"{row['phase']:<{width['phase']}}  {row['what']:<{width['what']}}"
            return f"{left}  {row['value']:>{width['value']}}  {row['note']}"

        header = {"phase": "phase", "what": "what", "value": "value", "note": "note"}
        return "\n".join(line(row) for row in [header, *self.rows])
