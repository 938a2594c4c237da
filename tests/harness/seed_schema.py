"""The published input schema (the seed's `input_schema.json`, copied to tests/data) tests check against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SEED = Path(__file__).resolve().parents[1] / "data" / "seed_input_schema.json"


def seed_schema() -> dict[str, Any]:
    """The published inputs (name, type, default, bounds, choices, description) and output."""
    return json.loads(SEED.read_text())
