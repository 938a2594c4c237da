"""Write tiny random FLUX-architecture weights in the real layout.

Usage: `python scripts/make_tiny_weights.py DIR [--seed N]`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flux_day.weights.tiny import write_tiny_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir", type=Path, help="weights root to write (created if absent)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    root = write_tiny_weights(args.dir, seed=args.seed)
    print(f"tiny weights written to {root}")


if __name__ == "__main__":
    main()
