"""One table of FLUX.1 variants drives the request checks, the manifest, loading and the tree builders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from flux_day.models import MODELS, shared_spec
from flux_day.schema import SCHEMA
from flux_day.weights.manifest import MANIFEST

ROOT = Path(__file__).resolve().parents[1]


def test_the_table_and_the_request_checks_load_without_torch() -> None:
    """Checking a request needs no model library: the choices come from the torch-free table."""
    code = (
        "import sys, flux_day.request; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    assert SCHEMA["model"].choices == tuple(MODELS)


def test_the_manifest_fetches_each_model_from_its_row_of_the_table() -> None:
    for spec in MODELS.values():
        (row,) = [r for r in MANIFEST if r.folder == spec.folder]
        assert (row.repo_id, row.revision) == (spec.repo_id, spec.revision)
        assert row.wants("transformer/diffusion_pytorch_model.safetensors")
        assert row.wants("vae/diffusion_pytorch_model.safetensors") == spec.ships_shared
    assert shared_spec().name == "dev"


def test_the_tiny_tree_is_written_from_the_table(tiny_weights: Path) -> None:
    for spec in MODELS.values():
        transformer = json.loads((tiny_weights / spec.folder / "transformer" / "config.json").read_text())
        scheduler = json.loads(
            (tiny_weights / spec.folder / "scheduler" / "scheduler_config.json").read_text()
        )
        assert transformer["guidance_embeds"] == spec.guidance_embeds
        assert {key: scheduler[key] for key in spec.scheduler} == dict(spec.scheduler)
