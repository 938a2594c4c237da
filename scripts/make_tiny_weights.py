"""Write random FLUX-architecture weights in the real layout; nothing is written where a tree already is.

Usage: `python scripts/make_tiny_weights.py DIR [--seed N] [--wide | --deep]`.
The default is the tiny tree (a few MB, the tests); `--wide` has FLUX.1's real layer widths with few
blocks (GBs, for benchmarks); `--deep` has FLUX.1's real 19 + 38 blocks at narrow widths (LoRA layouts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flux_day.weights.download import missing_folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("dir", type=Path, help="weights root to write (created if absent)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument("--wide", action="store_const", const="wide", dest="profile", help="real widths")
    profile.add_argument("--deep", action="store_const", const="deep", dest="profile", help="real depth")
    args = parser.parse_args()
    if not missing_folders(args.dir):
        print(f"{args.dir} already holds a weights tree; nothing written")
        return
    from scripts.random_weights.tree import write_tiny_weights

    root = write_tiny_weights(args.dir, seed=args.seed, profile=args.profile or "tiny")
    print(f"{args.profile or 'tiny'} weights written to {root}")


if __name__ == "__main__":
    main()
