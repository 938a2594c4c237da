"""The GPU proof's --tiny mode runs the whole proof on the CPU, so the script cannot rot between GPUs;
its preflight passes here in its CPU mode and names what is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts import gpu_proof
from scripts.proof.preflight import preflight

ROOT = Path(__file__).resolve().parents[1]
SEQUENCE = ("1. schnell go_fast + LoRA A", "2. schnell, go_fast=false", "3. schnell go_fast, no LoRA")


@dataclass(frozen=True)
class TinyProof:
    stdout: str
    stderr: str
    out: Path
    rows: list[dict[str, str]]


@pytest.fixture(scope="module")
def tiny_proof(tmp_path_factory: pytest.TempPathFactory) -> TinyProof:
    """`gpu_proof.py --tiny` run once: what it printed and the rows it wrote."""
    out = tmp_path_factory.mktemp("gpu-proof")
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_proof.py"), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return TinyProof(run.stdout, run.stderr, out, json.loads((out / "gpu_proof.json").read_text()))


def test_the_tiny_proof_runs_every_phase_headline_first_and_prints_one_table(
    tiny_proof: TinyProof,
) -> None:
    run, rows = tiny_proof, tiny_proof.rows
    assert "preflight modules      ok" in run.stderr
    value = {(row["phase"], row["what"]): row["value"] for row in rows}
    whats = [row["what"] for row in rows]
    assert "FAILED" not in whats, [row for row in rows if row["what"] == "FAILED"]
    # Setup compiles the fp8 copies as production does, or is cut off at its limit and says so (today's
    # whole-model compile of 22 sizes does not fit the tiny budget); then only the restart is skipped.
    compiled = ("setup compile", "cut off") not in value
    skipped = [row["phase"] for row in rows if row["what"] == "skipped"]
    assert skipped == ([] if compiled else ["restart"]), skipped
    headline = "go_fast (fp8 + compile)" if compiled else "go_fast (fp8 eager)"
    speed = [row["what"] for row in rows if row["phase"].startswith(("dev 512²", "schnell 512²"))]
    assert speed[:4] == ["first request after setup", headline] * 2  # dev, then schnell: before the rest
    for variant in ("full precision", "bare diffusers FluxPipeline (float32)", "go_fast (fp8 eager)"):
        assert speed.count(variant) == 2, variant  # dev and schnell
    phases = {row["phase"] for row in rows}
    for phase in ("build", "img2img 512² go_fast", "inpaint 512² go_fast", "80 GB card (H100)"):
        assert phase in phases, (phase, sorted(phases))
    switches = [row for row in rows if row["phase"] == "LoRA switch"]
    assert len(switches) == 4 and all(float(row["value"].split()[0]) > 0 for row in switches)
    assert value[("preflight", "imported every module the proof used")] == "yes"
    table = (run.out / "gpu_proof.txt").read_text()
    assert table.splitlines()[0].split() == ["phase", "what", "value", "note"]
    assert run.stdout.rstrip().endswith(table.rstrip())


def test_the_80gb_phase_runs_the_lora_leak_sequence_and_reports_its_checks(
    tiny_proof: TinyProof,
) -> None:
    """The checks ran and pass: the fp8 copy goes home whole and no LoRA leaks (tests/test_offload.py
    holds the engine to it under both recipes; these rows show it on the GPU too)."""
    rows = tiny_proof.rows
    card = [row for row in rows if row["phase"] == "80 GB card (H100)"]
    value = {row["what"]: row["value"] for row in card}
    placement = next(row["note"] for row in card if row["what"] == "placement")
    assert "schnell-full=offloaded" in placement and "dev-full=resident" in placement
    steps = [row["what"] for row in card if row["what"][:2] in {"1.", "2.", "3."}]
    assert [step[: len(prefix)] for step, prefix in zip(steps, SEQUENCE, strict=True)] == list(SEQUENCE)
    assert value["LoRA A changes the image"] == "yes"
    assert value["3rd image = the reference (no LoRA leaked)"] == "yes"
    at_home, _, weights = value["fp8 copy sent home: weights wholly in their home copy"].split()
    assert int(weights) > 0 and int(at_home) == int(weights)


def test_the_preflight_passes_on_this_cpu_in_its_cpu_mode(tmp_path: Path) -> None:
    lines: list[str] = []
    assert preflight(cuda=False, out=tmp_path, say=lines.append) == []
    names = [line.split()[1] for line in lines]
    assert names == ["python", "torch", "transformers", "diffusers", "torchao", "packages", "modules",
                     "host", "disk"]  # fmt: skip
    assert all(" ok " in line for line in lines)


@pytest.mark.parametrize("missing", ["torchao", "scripts.bench.memory_model"])
def test_the_preflight_fails_naming_a_module_it_cannot_import(
    missing: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # what an absent package looks like to `import`
    monkeypatch.setattr(sys, "argv", ["gpu_proof.py", "--preflight", "--tiny"])
    with pytest.raises(SystemExit) as exit:
        gpu_proof.main()
    assert exit.value.code != 0
    message = str(exit.value.code)
    assert message.startswith("gpu_proof.py: 1 preflight check(s) failed:")
    assert f"FAIL  cannot import {missing} ({missing} is missing" in message
