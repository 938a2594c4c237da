"""Known-harmless warnings that libraries log at import, kept out of the CLI's and the server's logs.

Each is matched by its logger and its words, so a different warning from the same library still shows;
logger filters act where a record is made, so they hold before the library is even imported.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Final

# (logger, what the warning says), each harmless here for the reason beside it.
KNOWN_HARMLESS: Final[tuple[tuple[str, str], ...]] = (
    # torchao ships these kernels built for other Python and GPU versions; flux-day calls none of them
    ("torchao", r"Failed to load \S*_C_(mxfp8|cutlass_90a)"),
    # triton comes with CUDA builds only; the CPU path never needs torchao's triton kernels
    ("torchao.kernel.intmm", r"Detected no triton"),
    # torchao registers two enums the old way: a deprecation for torchao's authors, not a fault
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported"),
    # only for loading checkpoints saved by torchao; flux-day quantizes at load and never reads one
    ("diffusers.quantizers.torchao.torchao_quantizer", r"Unable to import `torchao` Tensor objects"),
    # the PIL image processors it falls back to are the ones flux-day means to use
    ("transformers.utils.import_utils", r"requires torchvision \(not installed\); falling back"),
)


@functools.cache  # once, however often it is called
def quiet_known_library_warnings() -> None:
    """Filter each known-harmless warning at its logger."""
    for name, pattern in KNOWN_HARMLESS:
        matches = re.compile(pattern).search
        logging.getLogger(name).addFilter(lambda record, matches=matches: not matches(record.getMessage()))
