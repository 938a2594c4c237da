"""LoRA downloads into the shared disk cache: each file fetched once among all the processes sharing
the cache, checked as safetensors (a trained model's .tar unpacked first), kept from eviction while read.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flux_day.config import Settings
from flux_day.errors import LoraError
from flux_day.filelocks import LockTimeout
from flux_day.loras.archive import extract_lora, is_archive, is_safetensors
from flux_day.loras.cache import LoraCache
from flux_day.loras.fetch import DOWNLOAD_DEADLINE_S, Fetcher
from flux_day.loras.refs import LoraRef
from flux_day.loras.safetensors_file import check_lora_file
from flux_day.loras.sources import plan_file

log = logging.getLogger("flux_day.loras.manager")  # one log for reading LoRAs, whichever step
FILL_WAIT_S = DOWNLOAD_DEADLINE_S + 120  # the longest another process's download of a LoRA can take


class LoraDownloads:
    """The fetcher and the disk cache it fills."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.fetcher = Fetcher(settings)
        self.cache = LoraCache(settings.lora_cache, settings.lora_cache_bytes)

    @contextmanager
    def cached_file(self, ref: LoraRef) -> Iterator[Path]:
        """The ready .safetensors for `ref` in the disk cache, downloaded when absent: once among all
        the processes sharing the cache. No process evicts it until the block ends."""
        plan = plan_file(ref, self.settings, self.fetcher)
        found = True

        def fetch(prefix: str) -> Path:
            nonlocal found
            found = False
            # A failed fill's partials, the download's and the unpacked archive's, go in `filled`.
            partial = self.fetcher.download(ref, plan.url, self.cache.root, prefix, plan.credential)
            return self._as_safetensors(ref, partial, prefix)

        def waiting() -> None:
            log.info("%s: another process is downloading it; waiting", ref.shown)

        try:
            with self.cache.filled(plan.key, fetch, FILL_WAIT_S, waiting) as path:
                if found:
                    log.info("%s: from the LoRA cache", ref.shown)
                yield path
        except LockTimeout:
            raise LoraError(
                f"another replica has been downloading {ref.shown} into the LoRA cache "
                f"for over {FILL_WAIT_S} s; try again later."
            ) from None

    def _as_safetensors(self, ref: LoraRef, partial: Path, prefix: str) -> Path:
        """`partial` if it is a sound safetensors file, or the LoRA unpacked from it if it is a .tar."""
        with partial.open("rb") as handle:
            head = handle.read(9)
        if not is_safetensors(head) and is_archive(partial):
            descriptor, name = tempfile.mkstemp(dir=self.cache.root, prefix=prefix)
            with os.fdopen(descriptor, "wb") as target:
                member = extract_lora(partial, target, self.settings.max_lora_bytes)
            log.info("%s: took %s from the archive", ref.shown, member)
            partial.unlink()
            partial = Path(name)
        check_lora_file(partial)
        return partial
