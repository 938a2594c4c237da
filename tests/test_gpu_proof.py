"""The GPU proof's --tiny mode runs the whole proof on the CPU, so the script cannot rot between GPUs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_tiny_proof_runs_every_phase_and_prints_one_table(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_proof.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_proof.json").read_text())
    failed = [row for row in rows if row["what"] in {"FAILED", "skipped"}]
    assert not failed, failed
    phases = {row["phase"] for row in rows}
    for phase in ("build", "setup", "img2img 512² go_fast", "inpaint 512² go_fast", "80 GB card"):
        assert phase in phases, (phase, sorted(phases))
    whats = [row["what"] for row in rows]
    for variant in ("full precision", "go_fast (fp8 eager)", "bare diffusers FluxPipeline (bf16)"):
        assert whats.count(variant) == 2, variant  # dev and schnell
    assert whats.count("go_fast (fp8 + compile)") == 2
    switches = [row for row in rows if row["phase"].startswith("LoRA switch")]
    assert len(switches) == 8  # warm/cold x full/go_fast, on this card and the 80 GB one
    assert all(float(row["value"].split()[0]) > 0 for row in switches)
    placement = next(row["note"] for row in rows if row["what"] == "placement")
    assert "schnell-full=offloaded" in placement and "dev-full=resident" in placement
    table = (tmp_path / "gpu_proof.txt").read_text()
    assert table.splitlines()[0].split() == ["phase", "what", "value", "note"]
    assert run.stdout.rstrip().endswith(table.rstrip())
