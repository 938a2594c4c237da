"""Write `.cog/openapi_schema.json`, the OpenAPI document `cog build` writes, from `predict.py`.

Usage: `python scripts/write_openapi_schema.py [--out PATH]` (default: `.cog/openapi_schema.json` in
the repository root, where the Cog server started from the root looks for it).

With the file in place, `python -m cog.server.http` rejects out-of-bound numbers, unknown choices and
wrong types with a 422 before the predictor sees them, and serves the document at `/openapi.json`;
without it the server accepts any input and only the predictor's own checks apply. The file is a build
product (git-ignored): run this again after changing an input in `predict.py`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.openapi_schema import SCHEMA_PATH, write_openapi_schema

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / SCHEMA_PATH, help=f"where to write (default: {SCHEMA_PATH})"
    )
    args = parser.parse_args(argv)
    path = write_openapi_schema(ROOT, args.out)
    print(f"OpenAPI schema written to {path}")


if __name__ == "__main__":
    main()
