"""Known-harmless warnings that libraries log at import, kept out of the CLI's and the server's logs.

Each is matched by its logger and its words, so a different warning from the same library still shows.
Logger filters act where a record is made, so they hold before the library is even imported.
"""

from __future__ import annotations

import logging
import re
from typing import Final

# (logger, what the warning says, why it is harmless here)
KNOWN_HARMLESS: Final[tuple[tuple[str, str, str], ...]] = (
    (
        "torchao",
        r"Failed to load \S*_C_(mxfp8|cutlass_90a)",
        "torchao ships these kernels built for other Python and GPU versions; flux-day calls none of them",
    ),
    (
        "torchao.kernel.intmm",
        r"Detected no triton",
        "triton comes with CUDA builds only; the CPU path never needs torchao's triton kernels",
    ),
    (
        "torch.utils._pytree",
        r"is an Enum subclass and is now natively supported",
        "torchao registers two enums the old way: a deprecation for torchao's authors, not a fault",
    ),
    (
        "diffusers.quantizers.torchao.torchao_quantizer",
        r"Unable to import `torchao` Tensor objects",
        "only for loading checkpoints saved by torchao; flux-day quantizes at load and never reads one",
    ),
    (
        "transformers.utils.import_utils",
        r"requires torchvision \(not installed\); falling back",
        "the PIL image processors it falls back to are the ones flux-day means to use",
    ),
)


class _KnownHarmless(logging.Filter):
    """Drops the records of one logger whose message matches `pattern`."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_known_library_warnings() -> None:
    """Filter each known-harmless warning at its logger (once, however often this is called)."""
    for name, pattern, _reason in KNOWN_HARMLESS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownHarmless) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_KnownHarmless(pattern))
