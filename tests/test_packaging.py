"""The README's Quick start, CI and the Cog build agree with each other and with pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "Quick start holds one fenced block"
    return [line for line in blocks[0].splitlines() if line.strip()]


def test_quick_start_is_two_commands_and_ci_runs_the_second() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2
    assert "make_tiny_weights.py weights/tiny" in commands[0] and "generate" in commands[0]
    assert "pytest" in commands[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_lines


def test_cog_image_installs_the_pinned_packages() -> None:
    pinned = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    cog_packages = set(re.findall(r'^\s*-\s*"([^"]+)"', (ROOT / "cog.yaml").read_text(), flags=re.M))
    # The Cog image brings cog (and its coglet server) itself.
    assert cog_packages == {p for p in pinned if not p.startswith("cog==")}
    assert re.search(r'^predict: "predict.py:Predictor"$', (ROOT / "cog.yaml").read_text(), flags=re.M)


# torch release -> the CUDA versions its Linux x86_64 wheels are built for (PyPI's default wheel of
# 2.13.0 requires cuda-toolkit 13.0.3); and the CUDA versions cog has base images for (its
# pkg/config/cuda_compatibility.json, replicate/cog main of August 2026: 11.x to 13.2).
TORCH_CUDA = {"2.13.0": {"13.0"}}
COG_CUDA_BASES = {"12.6", "12.8", "12.9", "13.0", "13.1", "13.2"}


def test_cog_yaml_names_a_cuda_that_the_pinned_torch_is_built_for() -> None:
    """cog cannot infer CUDA for a torch newer than its matrix: `cog build` would stop without it."""
    config = (ROOT / "cog.yaml").read_text()
    torch_pin = re.search(r'"torch==([^"]+)"', config)
    cuda = re.search(r'^\s*cuda:\s*"([0-9.]+)"', config, flags=re.M)
    assert torch_pin and cuda, "cog.yaml pins torch and names its CUDA"
    assert re.search(r"^\s*gpu: true$", config, flags=re.M)
    assert cuda.group(1) in TORCH_CUDA[torch_pin.group(1)]
    assert cuda.group(1) in COG_CUDA_BASES
