"""The command line writes images outside Cog and reports bad input in one sentence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flux_day", "generate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_generate_builds_tiny_weights_and_writes_images(tmp_path: Path) -> None:
    result = run_cli(
        "a red fox",
        "--weights",
        str(tmp_path / "w"),
        "--tiny",
        "--out",
        str(tmp_path / "o"),
        "--num-inference-steps",
        "2",
        "--megapixels",
        "0.25",
        "--seed",
        "9",
        "--num-outputs",
        "2",
        "--output-format",
        "png",
    )
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.split()]
    assert [p.name for p in paths] == ["dev-9.png", "dev-10.png"]
    assert all(Image.open(p).size == (512, 512) for p in paths)
    assert "100%" in result.stderr  # progress is shown


def test_bad_input_is_one_sentence_and_exit_2(tiny_weights: Path, tmp_path: Path) -> None:
    result = run_cli("x", "--weights", str(tiny_weights), "--num-outputs", "9", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "error: num_outputs: 9 is out of range" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_lora_url_is_cached_under_the_weights_given(tmp_path: Path) -> None:
    from tests.harness import lora_files as lf
    from tests.harness.http_files import HttpFiles

    weights, common = tmp_path / "w", ["--num-inference-steps", "2", "--megapixels", "0.25", "--seed", "3"]
    with HttpFiles() as files:
        url = files.serve("/style.safetensors", lf.to_bytes(lf.kohya(lf.random_lora(1))))
        base = run_cli("a fox", "--weights", str(weights), "--tiny", "--out", str(tmp_path / "a"), *common)
        styled = run_cli(
            *("a fox", "--weights", str(weights), "--out", str(tmp_path / "b"), "--replicate-weights", url),
            *common,
            env={"FLUX_DAY_ALLOW_PRIVATE_URLS": "1"},
        )
    assert base.returncode == 0 and styled.returncode == 0, styled.stderr[-2000:]
    assert len(list((weights / "lora-cache").glob("*.safetensors"))) == 1
    (a,), (b,) = list((tmp_path / "a").iterdir()), list((tmp_path / "b").iterdir())
    assert a.read_bytes() != b.read_bytes()
