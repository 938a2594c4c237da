"""Download the base weights (FLUX.1 dev and schnell, the safety models) into the weights layout.

Usage: `python scripts/download_weights.py [--weights DIR]` (default: FLUX_DAY_WEIGHTS, else ./weights).
Fetches from HF_ENDPOINT what flux_day/weights/manifest.py lists and the root lacks (FLUX.1 [dev] is
gated: HF_TOKEN must be of an account that accepted its license), checked; run again to resume. It
downloads even with FLUX_DAY_OFFLINE=1, which points here. Exit status 0, or 2 with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flux_day.config import Settings
from flux_day.errors import WeightsError
from flux_day.weights.download import ensure_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", type=Path, help="weights root (default: FLUX_DAY_WEIGHTS or ./weights)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings.from_env()
    settings = dataclasses.replace(settings, offline=False, weights=args.weights or settings.weights)
    try:
        ensure_weights(settings)
    except WeightsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"base weights complete under {settings.weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
