"""The command line writes images outside Cog, takes its options from the schema, and reports bad input
in one sentence before torch is imported."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from flux_day.cli import ignored_inputs, output_path, parser
from flux_day.request import GenerationRequest
from flux_day.schema import INPUTS
from scripts.random_weights.tree import write_tiny_weights

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


def test_generate_writes_images(tiny_weights: Path, tmp_path: Path) -> None:
    result = run_cli(
        "a red fox",
        "--weights",
        str(tiny_weights),
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
    assert [p.name for p in paths] == ["dev-txt2img-9.png", "dev-txt2img-10.png"]
    assert all(Image.open(p).size == (512, 512) for p in paths)
    assert "100%" in result.stderr  # progress is shown
    for harmless in ("_C_mxfp8", "triton", "Enum subclass", "torchvision", "Unable to import `torchao`"):
        assert harmless not in result.stderr, harmless


def test_bad_input_is_one_sentence_and_exit_2(tiny_weights: Path, tmp_path: Path) -> None:
    result = run_cli("x", "--weights", str(tiny_weights), "--num-outputs", "9", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "error: num_outputs: 9 is out of range" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_lora_url_is_cached_under_the_weights_given(tmp_path: Path) -> None:
    from tests.harness import lora_files as lf
    from tests.harness.http_files import HttpFiles

    weights, common = tmp_path / "w", ["--num-inference-steps", "2", "--megapixels", "0.25", "--seed", "3"]
    (tmp_path / "folder").mkdir()
    (tmp_path / "local.safetensors").write_bytes(lf.to_bytes(lf.kohya(lf.random_lora(2))))
    (tmp_path / "folder" / "any.safetensors").write_bytes(lf.to_bytes(lf.kohya(lf.random_lora(3))))
    local = ["--extra-lora", str(tmp_path / "local.safetensors"), "--lora", f"{tmp_path / 'folder'}:0.5"]
    with HttpFiles() as files:
        url = files.serve("/style.safetensors", lf.to_bytes(lf.kohya(lf.random_lora(1))))
        base = run_cli(
            "a fox", "--weights", str(write_tiny_weights(weights)), "--out", str(tmp_path / "a"), *common
        )
        styled = run_cli(
            *("a fox", "--weights", str(weights), "--out", str(tmp_path / "b"), "--replicate-weights", url),
            *local,
            *common,
            env={"FLUX_DAY_ALLOW_PRIVATE_URLS": "1"},
        )
    assert base.returncode == 0 and styled.returncode == 0, styled.stderr[-2000:]
    assert len(list((weights / "lora-cache").glob("*.safetensors"))) == 1
    (a,), (b,) = list((tmp_path / "a").iterdir()), list((tmp_path / "b").iterdir())
    assert a.read_bytes() != b.read_bytes()
    # three LoRAs at once: a URL, a local file and a local folder (the server refuses paths)
    summary = next(line for line in styled.stderr.splitlines() if "request mode=" in line)
    assert summary.count("x1") + summary.count("x0.5") == 3, summary


def test_help_shows_every_schema_input_with_its_choices_or_range_and_default() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flux_day", "generate", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for field in INPUTS:
        option = field.name if field.required else f"--{field.name.replace('_', '-')}"
        assert option in text, option
        if field.choices:
            assert f"one of {', '.join(field.choices)}" in text, field.name
        if field.bounds:
            assert f"from {field.bounds[0]:g} to {field.bounds[1]:g}" in text, field.name
        if field.default is not None:
            assert f"default: {field.default}" in text, field.name
    assert "--lora REF[:SCALE]" in text and "--download" in text


BEFORE_TORCH = """
import sys
from flux_day.cli import main
for argv in ARGVS:
    try:
        print("rc", main(["generate", *argv]), file=sys.stderr)
    except SystemExit as exit:
        print("rc", exit.code, file=sys.stderr)
print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""


def test_mistakes_are_one_sentence_each_before_torch_is_imported(tmp_path: Path) -> None:
    """Every check a person can fail runs before torch, diffusers and the weights are touched."""
    empty, out = str(tmp_path / "empty"), str(tmp_path / "out")
    argvs = [
        ["x", "--aspect-ration", "16:9"],
        ["x", "--num-outputs", "9", "--out", out],
        ["x", "--out", "/proc/nope"],
        ["x", "--image", str(tmp_path / "none.png"), "--out", out],
        ["x", "--lora", "owner/model:7", "--out", out],
        ["x", "--weights", empty, "--width", "512", "--out", out],
    ]
    script = BEFORE_TORCH.replace("ARGVS", repr(argvs))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    err = result.stderr
    assert "did you mean --aspect-ratio?" in err
    assert "error: num_outputs: 9 is out of range; use an integer from 1 to 4." in err
    assert "error: --out: '/proc/nope' cannot be written" in err
    assert "error: image: there is no such file;" in err and "not an image" not in err
    assert "error: --lora: scale 7 is out of range; use a number from -1 to 3." in err
    assert "width: ignored unless --aspect-ratio custom" in err
    # no weights and no --download: the folder, the size, the licence and the command, and no download
    assert f"Base weights are missing under {empty}" in err and "GB to download" in err
    assert "gated" in err and "HF_TOKEN" in err and "--download" in err
    assert "scripts/download_weights.py" in err
    assert err.count("rc 2") == len(argvs) and "Traceback" not in err
    assert "torch imported: False" in err
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())


def test_image_names_never_collide_across_modes_go_fast_or_runs(tmp_path: Path) -> None:
    plain = GenerationRequest.from_inputs(prompt="x", seed=5, output_format="png")
    fast = GenerationRequest.from_inputs(prompt="x", seed=5, output_format="png", go_fast=True)
    names = [output_path(tmp_path, request, 5).name for request in (plain, fast, plain)]
    assert names == ["dev-txt2img-5.png", "dev-txt2img-fast-5.png", "dev-txt2img-5-2.png"]


@pytest.mark.parametrize(
    ("argv", "note"),
    [
        (["--width", "512"], "width: ignored unless --aspect-ratio custom"),
        (["--image", "a.png", "--aspect-ratio", "16:9"], "aspect_ratio: ignored with --image"),
        (["--prompt-strength", "0.5"], "prompt_strength: ignored without --image"),
        (["--output-format", "png", "--output-quality", "90"], "output_quality: ignored for png"),
        (["--aspect-ratio", "custom", "--width", "512", "--height", "512"], None),
    ],
)
def test_an_input_that_will_be_ignored_gets_a_note(argv: list[str], note: str | None) -> None:
    args = parser().parse_args(["x", *argv])
    inputs = {field.name: getattr(args, field.name) for field in INPUTS}
    notes = ignored_inputs({name: value for name, value in inputs.items() if value is not None})
    assert notes == [] if note is None else (len(notes) == 1 and note in notes[0]), notes


def test_ctrl_c_is_one_line_and_leaves_no_image(tiny_weights: Path, tmp_path: Path) -> None:
    slow = ["--aspect-ratio", "custom", "--width", "1024", "--height", "1024", "--num-inference-steps", "50"]
    command = ["a fox", "--weights", str(tiny_weights), "--out", str(tmp_path), *slow]
    process = subprocess.Popen(
        [sys.executable, "-m", "flux_day", "generate", *command], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    for line in process.stderr:  # models loaded: the run is under way
        if "loaded dev and schnell" in line:
            break
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=60)[1]
    assert process.returncode == 130, rest[-2000:]
    assert "Traceback" not in rest
    assert rest.strip().splitlines()[-1] == "interrupted; no image of this run is left half-written."
    assert list(tmp_path.iterdir()) == []


def test_only_the_known_harmless_library_warnings_are_filtered(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("torchao")  # importing flux_day installed the filters
    with caplog.at_level(logging.WARNING, logger="torchao"):
        logger.warning("Failed to load /x/_C_mxfp8.abi3.so: Could not load this library")
        logger.warning("Failed to load /x/_C_other.so: a real problem")
    assert [record.getMessage() for record in caplog.records] == [
        "Failed to load /x/_C_other.so: a real problem"
    ]
