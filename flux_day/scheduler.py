"""`GpuScheduler`: many requests at once on one GPU, for Cog's async `run` with `concurrency.max`.

Preparing runs concurrently in threads; the GPU part runs one request at a time in order of readiness
(`asyncio.Lock` is FIFO), so a slow download holds up no one. Parsed LoRAs waiting for the GPU count
against `FLUX_DAY_PARSED_LORA_BYTES`. A cancelled request yields its turn once its LoRAs are restored.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from flux_day.cancel import cancellable
from flux_day.engine import Engine
from flux_day.generation import Generation, PreparedRequest
from flux_day.request import GenerationRequest
from flux_day.server_log import log as server_log

Result = TypeVar("Result")
# asyncio's default executor has min(32, CPUs + 4) threads, fewer than the requests that may wait on
# downloads at once on a small machine; Cog's slots bound the requests, this bounds nothing they need.
THREADS = 64


class GpuScheduler:
    """Prepares requests concurrently, runs them on the GPU one at a time; `timing.queue` is the wait."""

    def __init__(self, engine: Engine, running_file: Path | None = None) -> None:
        self.engine = engine
        self.running_file = running_file  # holds `running`, for the preStop hook (scripts/health_probe.py)
        self._turn = asyncio.Lock()
        self._threads = ThreadPoolExecutor(THREADS, thread_name_prefix="flux-day")
        self.running = 0  # predictions inside `admitted` blocks (changed on the event loop's thread only)
        self.held_bytes = 0  # parsed LoRAs of prepared requests not yet done with the GPU
        self._freed = asyncio.Event()  # set (and replaced) whenever `held_bytes` shrinks
        self._publish()

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """A prediction's whole `run`, counted in `running` (its files are read by Cog only after it)."""
        self._publish(+1)
        try:
            yield
        finally:
            self._publish(-1)

    def _publish(self, change: int = 0) -> None:
        """Count `change` into `running` and write it for the preStop hook (coglet says READY while a slot
        is free)."""
        self.running += change
        if self.running_file is None:
            return
        partial = self.running_file.with_name(f"{self.running_file.name}.{os.getpid()}")
        try:
            partial.write_text(str(self.running))
            os.replace(partial, self.running_file)
        except OSError as error:  # the hook then waits for READY alone; predictions go on
            server_log.warning("cannot write %s: %s", self.running_file, error)

    async def in_thread(self, work: Callable[..., Result], *args: object, **kwargs: object) -> Result:
        """`work` in a thread under the caller's context (Cog's log routing, metrics, cancel flag)."""
        call = functools.partial(contextvars.copy_context().run, work, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._threads, call)

    async def generate(self, request: GenerationRequest) -> Generation:
        flag = threading.Event()  # set by a cancel: `flux_day.cancel`
        with cancellable(flag):  # `in_thread` carries it into this request's threads
            while self.held_bytes and self.held_bytes >= self.engine.settings.parsed_lora_bytes:
                await self._freed.wait()  # parsed LoRAs fill the budget; with none held, any request goes
            prepared = await self._until_done(flag, self.engine.prepare, request)
            held = sum({id(w): w.held_bytes for w in prepared.loras if w is not None}.values())
            self.held_bytes += held
            try:
                ready = time.perf_counter()
                async with self._turn:
                    prepared.timings["queue"] = time.perf_counter() - ready
                    return await self._on_the_gpu(flag, prepared)
            finally:
                self.held_bytes -= held
                self._freed.set()
                self._freed = asyncio.Event()

    async def _on_the_gpu(self, flag: threading.Event, prepared: PreparedRequest) -> Generation:
        try:
            return await self._until_done(flag, self.engine.run_prepared, prepared)
        except asyncio.CancelledError:
            # Cog closed the prediction's log at the cancel: the operator's log says where it stopped.
            request = prepared.request
            server_log.info(
                "request cancelled after %d of %d denoising steps; every LoRA restored",
                self.engine.steps_done,
                request.num_inference_steps * request.num_outputs,
            )
            raise

    async def _until_done(self, flag: threading.Event, work: Callable[..., Result], *args: object) -> Result:
        """`work(*args)` in a thread; cancelled, the thread is told (`flag`) and awaited first, so what it
        holds (the GPU, fused LoRAs, a lock) is let go before the cancel goes on."""
        thread = asyncio.ensure_future(self.in_thread(work, *args))
        try:
            return await asyncio.shield(thread)
        except asyncio.CancelledError:
            flag.set()
            while not thread.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({thread})
            if not thread.cancelled():
                thread.exception()  # retrieved: its `Cancelled` (or failure) is this cancel's, not news
            raise
