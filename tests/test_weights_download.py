"""Base weights from a Hub: the manifest's repos served by a fake Hugging Face (a real HTTP server that
huggingface_hub talks to, with a CDN on another origin), filled with the tiny weights.

What a user relies on: a download gives the tree the predictor loads, byte for byte; a dropped
connection resumes; a file that does not match the Hub's checksum is refused and nothing incomplete
ever looks complete; offline mode never downloads; a complete tree costs no request; HF_TOKEN reaches
the Hub and nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from flux_day.config import Settings
from flux_day.errors import WeightsError
from flux_day.pipelines import build_pipelines, load_models
from flux_day.weights.download import SOURCE_RECORD, STAGING, ensure_weights, missing_folders
from flux_day.weights.manifest import (
    DEV_FOLDER,
    MANIFEST,
    NEVER_FETCHED,
    NSFW_CLASSIFIER_FOLDER,
    SAFETY_CHECKER_FOLDER,
    SCHNELL_FOLDER,
    Source,
    has_base_models,
)
from tests.harness.fake_services import HF_LFS_SUFFIXES, FakeHuggingFace

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_fake_secret_token_1234"
DEV = next(row for row in MANIFEST if row.folder == DEV_FOLDER)
FOLDERS = [row.folder for row in MANIFEST]
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"
TRANSFORMER_FILE = "transformer/diffusion_pytorch_model.safetensors"

# Files the real repos also hold that must never be fetched: single-file checkpoints, pickles, extras.
DECOYS = {
    DEV_FOLDER: ("flux1-dev.safetensors", "ae.safetensors", "README.md", "dev_grid.jpg"),
    SCHNELL_FOLDER: ("flux1-schnell.safetensors", "text_encoder/config.json", "vae/config.json"),
    SAFETY_CHECKER_FOLDER: ("pytorch_model.bin", "flax_model.msgpack"),
    NSFW_CLASSIFIER_FOLDER: ("pytorch_model.bin", "optimizer.pt", "onnx/model.onnx"),
}


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (posix path → bytes)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def flipped(data: bytes) -> bytes:
    """The same length, one byte different: only a checksum can tell."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


def serve(hub: FakeHuggingFace, source_root: Path, token: str | None = None) -> dict[str, dict[str, bytes]]:
    """Put each folder of `source_root` in its manifest repo at its manifest revision, with decoys;
    return what each folder should end up holding."""
    expected: dict[str, dict[str, bytes]] = {}
    repos: dict[tuple[str, str], dict[str, bytes]] = {}
    for row in MANIFEST:
        folder, files = row.folder, tree(source_root / row.folder)
        assert all(row.wants(path) for path in files), f"the manifest would not fetch all of {folder}/"
        expected[folder] = files
        decoys = {path: f"decoy {folder}/{path}".encode() for path in DECOYS[folder]}
        assert not any(row.wants(path) for path in decoys)
        repos.setdefault((row.repo_id, row.revision), {}).update(files | decoys)
    for (repo_id, revision), files in repos.items():
        hub.add_repo(repo_id, files, revision=revision, token=token)
    return expected


def settings_for(root: Path, hub: FakeHuggingFace | None = None, offline: bool = False) -> Settings:
    env = {"FLUX_DAY_WEIGHTS": str(root), "FLUX_DAY_OFFLINE": "1" if offline else "0"}
    if hub is not None:
        env["HF_ENDPOINT"] = hub.base
    return Settings.from_env(env)


def downloaded(root: Path) -> dict[str, dict[str, bytes]]:
    """Each layout folder's files as downloaded, without the source record."""
    return {
        folder: {path: data for path, data in tree(root / folder).items() if path != SOURCE_RECORD}
        for folder in FOLDERS
    }


def requests_made(hub: FakeHuggingFace) -> int:
    return len(hub.api.requests) + len(hub.cdn.requests)


@pytest.fixture(autouse=True)
def no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start without HF_TOKEN, whatever the machine has; the token test sets its own."""
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def hub() -> Iterator[FakeHuggingFace]:
    with FakeHuggingFace() as fake:
        yield fake
        assert not fake.api.failures, fake.api.failures


def test_the_manifest_covers_the_layout_with_safetensors_only(tiny_weights: Path) -> None:
    assert FOLDERS == [DEV_FOLDER, SCHNELL_FOLDER, SAFETY_CHECKER_FOLDER, NSFW_CLASSIFIER_FOLDER]
    pickles = ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "weights.pkl", "x.pickle")
    assert len(pickles) == len(NEVER_FETCHED)
    for row in MANIFEST:
        assert row.revision, row
        for prefix in {pattern.rpartition("/")[0] for pattern in row.allow}:
            assert not any(row.wants(f"{prefix}/{name}".lstrip("/")) for name in pickles), row
    anything = Source(DEV_FOLDER, DEV.repo_id, DEV.revision, allow=("*",), required=())
    assert anything.wants("vae/model.safetensors") and not any(anything.wants(f"vae/{n}") for n in pickles)
    assert not DEV.wants("flux1-dev.safetensors") and not DEV.wants("ae.safetensors")
    assert missing_folders(tiny_weights) == []  # the tiny tree is what a complete download looks like


def test_a_download_into_an_empty_root_is_the_tree_the_predictor_loads(
    hub: FakeHuggingFace, tiny_weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = serve(hub, tiny_weights)
    root = tmp_path / "weights"
    with caplog.at_level(logging.INFO, logger="flux_day.weights.download"):
        ensure_weights(settings_for(root, hub))

    assert downloaded(root) == expected  # byte for byte, and nothing else (no decoy, no pickle)
    assert has_base_models(root) and missing_folders(root) == []
    assert list((root / STAGING).iterdir()) == []  # no staging copy, no lock file left
    record = json.loads((root / DEV_FOLDER / SOURCE_RECORD).read_text())
    (source,) = record["sources"]
    assert source["repo_id"] == DEV.repo_id and len(source["commit"]) == 40
    assert set(source["files"]) == set(expected[DEV_FOLDER])
    decoy_paths = [hub.resolve_path(DEV.repo_id, name, source["commit"]) for name in DECOYS[DEV_FOLDER]]
    assert not any(hub.api.hits[path] for path in decoy_paths)
    notice, *lines = [r.getMessage() for r in caplog.records if r.name == "flux_day.weights.download"]
    # said before any download: the folder, the size, dev's licence and HF_TOKEN
    assert f"missing under {root}" in notice and "GB to download" in notice, notice
    assert "gated" in notice and "HF_TOKEN" in notice
    assert len(lines) == len(FOLDERS), lines  # one line per folder, with sizes and time
    assert any(f"{DEV_FOLDER}/ complete" in line and "KB" in line and "s" in line for line in lines)

    models = load_models(root, torch.float32)
    pipelines = {model: build_pipelines(models, model, t) for model, t in models.transformers.items()}
    assert set(pipelines) == {"dev", "schnell"}


def test_a_dropped_connection_resumes_with_a_range_request(
    hub: FakeHuggingFace, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client writes what it receives in DOWNLOAD_CHUNK_SIZE pieces (10 MB), and resumes from what
    # it wrote: real shards are GBs, a tiny file would have nothing written yet. Scale the chunk down.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 << 10)
    expected = serve(hub, tiny_weights)
    data = expected[DEV_FOLDER][TRANSFORMER_FILE]
    cdn_path = hub.lfs_path(data)
    hub.cdn.cut_once(cdn_path, after=2 * (64 << 10))  # two chunks in, of 282 KB
    root = tmp_path / "weights"

    ensure_weights(settings_for(root, hub))

    ranges = [headers.get("range") for headers in hub.cdn.headers[cdn_path]]
    assert ranges == [None, f"bytes={2 * (64 << 10)}-"]
    assert (root / DEV_FOLDER / TRANSFORMER_FILE).read_bytes() == data
    assert downloaded(root) == expected


@pytest.mark.parametrize("corrupted", [VAE_FILE, "model_index.json"], ids=["lfs-sha256", "git-blob-id"])
def test_a_file_that_fails_its_checksum_is_refused_and_nothing_looks_complete(
    hub: FakeHuggingFace, tiny_weights: Path, tmp_path: Path, corrupted: str
) -> None:
    expected = serve(hub, tiny_weights)
    bad = flipped(expected[DEV_FOLDER][corrupted])
    hub.tamper(DEV.repo_id, corrupted, bad)
    root = tmp_path / "weights"

    with pytest.raises(WeightsError, match="checksum") as refusal:
        ensure_weights(settings_for(root, hub))
    message = str(refusal.value)
    assert f"{DEV_FOLDER}/{corrupted}" in message and DEV.repo_id in message
    assert not (root / DEV_FOLDER).exists() and not has_base_models(root)
    assert missing_folders(root) == FOLDERS
    everything = [p.read_bytes() for p in root.rglob("*") if p.is_file()]
    assert bad not in everything  # the corrupted bytes were deleted, not kept anywhere

    # Once the Hub serves the right bytes, running again finishes, fetching only what is missing.
    del hub.tampered[(DEV.repo_id, corrupted)]
    lfs_before = {path: hub.cdn.hits[hub.lfs_path(data)] for path, data in expected[DEV_FOLDER].items()}
    ensure_weights(settings_for(root, hub))
    assert downloaded(root) == expected and has_base_models(root)
    # Files the first run verified are kept; the others, the refused one included, are fetched.
    for path, data in expected[DEV_FOLDER].items():
        if Path(path).suffix in HF_LFS_SUFFIXES:
            again = hub.cdn.hits[hub.lfs_path(data)] - lfs_before[path]
            assert again == (0 if lfs_before[path] and path != corrupted else 1), path
    if corrupted == VAE_FILE:  # fetched after the text encoders and the transformer
        assert sum(map(bool, lfs_before.values())) > 1


def test_offline_with_the_weights_present_makes_no_request(hub: FakeHuggingFace, tiny_weights: Path) -> None:
    ensure_weights(settings_for(tiny_weights, hub, offline=True))
    assert requests_made(hub) == 0


def test_offline_with_weights_missing_says_which_folder_and_the_command_in_one_sentence(
    tiny_weights: Path, tmp_path: Path
) -> None:
    root = tmp_path / "weights"
    shutil.copytree(tiny_weights, root, ignore=shutil.ignore_patterns("lora-cache", NSFW_CLASSIFIER_FOLDER))
    with pytest.raises(WeightsError) as missing:
        ensure_weights(settings_for(root, offline=True))
    message = str(missing.value)
    assert message == (
        f"Base weights are missing under {root} ({NSFW_CLASSIFIER_FOLDER}/) and FLUX_DAY_OFFLINE=1 forbids "
        f"downloading them: fill them with `FLUX_DAY_WEIGHTS={root} python scripts/download_weights.py` "
        f"(or `python scripts/download_weights.py --weights {root}`)."
    )
    assert not (root / NSFW_CLASSIFIER_FOLDER).exists() and not (root / STAGING).exists()


def test_a_complete_tree_makes_no_request(hub: FakeHuggingFace, tiny_weights: Path) -> None:
    ensure_weights(settings_for(tiny_weights, hub))  # nothing served: any request would fail
    assert requests_made(hub) == 0
    assert not (tiny_weights / STAGING).exists()


def test_an_incomplete_folder_is_downloaded_again_and_replaced(
    hub: FakeHuggingFace, tiny_weights: Path, tmp_path: Path
) -> None:
    expected = serve(hub, tiny_weights)
    root = tmp_path / "weights"
    shutil.copytree(tiny_weights, root, ignore=shutil.ignore_patterns("lora-cache"))
    (root / SCHNELL_FOLDER / TRANSFORMER_FILE).unlink()  # a copy that stopped half-way
    assert missing_folders(root) == [SCHNELL_FOLDER]

    ensure_weights(settings_for(root, hub))

    assert downloaded(root) == expected
    schnell = next(row for row in MANIFEST if row.folder == SCHNELL_FOLDER)
    assert hub.api.requests and all(schnell.repo_id in r.path for r in hub.api.requests)
    schnell_weights = hub.lfs_path(expected[SCHNELL_FOLDER][TRANSFORMER_FILE])
    assert {r.path for r in hub.cdn.requests} == {schnell_weights}


def test_hf_token_reaches_the_hub_and_never_the_cdn_nor_a_log(
    hub: FakeHuggingFace,
    tiny_weights: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    expected = serve(hub, tiny_weights, token=TOKEN)  # private repos: nothing without the token
    root = tmp_path / "weights"
    with pytest.raises(WeightsError, match=r"does not exist or is private \(no HF_TOKEN was set"):
        ensure_weights(settings_for(root, hub))

    refused = len(hub.api.requests)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with caplog.at_level(logging.DEBUG):
        ensure_weights(settings_for(root, hub))

    assert downloaded(root) == expected
    assert hub.cdn.requests and hub.api.requests[refused:]
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.api.requests[refused:])
    assert not any(r.authorization for r in hub.cdn.requests)
    assert TOKEN not in caplog.text
    assert not any(TOKEN.encode() in p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_a_token_that_cannot_read_the_repo_is_named_in_the_refusal(
    hub: FakeHuggingFace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_repo(DEV.repo_id, {"model_index.json": b"{}"}, revision=DEV.revision, token=TOKEN)
    manifest = (Source(DEV_FOLDER, DEV.repo_id, DEV.revision, ("model_index.json",), ("model_index.json",)),)
    monkeypatch.setenv("HF_TOKEN", "hf_someone_elses_token")
    with pytest.raises(WeightsError) as refusal:
        ensure_weights(settings_for(tmp_path / "weights", hub), manifest)
    assert str(refusal.value) == (
        f"{hub.base} refused the file list of {DEV.repo_id} with HTTP 401 (HF_TOKEN cannot read it)."
    )


def test_an_unreachable_hub_is_named_in_the_error(tmp_path: Path) -> None:
    with FakeHuggingFace() as gone:
        endpoint = gone.base  # a port nothing listens on once it is closed
    root = tmp_path / "weights"
    with pytest.raises(WeightsError) as failure:
        ensure_weights(Settings.from_env({"FLUX_DAY_WEIGHTS": str(root), "HF_ENDPOINT": endpoint}))
    assert str(failure.value).startswith(
        f"Downloading the file list of {DEV.repo_id} from {endpoint} failed (ConnectError"
    )
    assert missing_folders(root) == FOLDERS


def test_the_script_downloads_even_when_offline_is_set_and_exits_2_with_the_reason(
    hub: FakeHuggingFace, tiny_weights: Path, tmp_path: Path
) -> None:
    script = [sys.executable, str(REPO_ROOT / "scripts" / "download_weights.py")]
    env = {**os.environ, "HF_ENDPOINT": hub.base, "FLUX_DAY_OFFLINE": "1"}
    env.pop("HF_TOKEN", None)
    root = tmp_path / "weights"

    failed = subprocess.run([*script, "--weights", str(root)], env=env, capture_output=True, text=True)
    assert failed.returncode == 2, failed.stderr
    assert f"{DEV.repo_id} does not exist or is private" in failed.stderr

    expected = serve(hub, tiny_weights)
    done = subprocess.run(script, env={**env, "FLUX_DAY_WEIGHTS": str(root)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{DEV_FOLDER}/ complete" in done.stderr
    assert downloaded(root) == expected


def test_two_processes_on_one_root_share_the_folders_out_and_fetch_each_file_once(
    hub: FakeHuggingFace, tiny_weights: Path, tmp_path: Path
) -> None:
    """As replicas starting together on an empty volume: the second leaves the first's folder alone,
    fetches the others meanwhile, then waits for the first's."""
    expected = serve(hub, tiny_weights)
    held = hub.lfs_path(expected[DEV_FOLDER][TRANSFORMER_FILE])
    gate = hub.hold(expected[DEV_FOLDER][TRANSFORMER_FILE])
    root = tmp_path / "weights"
    script = [sys.executable, str(REPO_ROOT / "scripts" / "download_weights.py"), "--weights", str(root)]
    env = {**os.environ, "HF_ENDPOINT": hub.base}
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    with logs[0].open("w") as first_log:
        first = subprocess.Popen(script, env=env, stderr=first_log, stdout=subprocess.DEVNULL)
    wait_until(lambda: hub.cdn.hits[held] == 1, "the first process fetches the dev transformer")
    with logs[1].open("w") as second_log:
        second = subprocess.Popen(script, env=env, stderr=second_log, stdout=subprocess.DEVNULL)
    wait_until(lambda: missing_folders(root) == [DEV_FOLDER], "the second fetches the other folders")
    wait_until(lambda: "waiting for it" in logs[1].read_text(), "the second waits for the dev folder")
    gate.set()
    assert first.wait(60) == 0 and second.wait(60) == 0, [log.read_text() for log in logs]

    assert downloaded(root) == expected
    assert list((root / STAGING).iterdir()) == []
    assert all(hits == 1 for hits in hub.cdn.hits.values()), hub.cdn.hits
    written = [log.read_text() for log in logs]
    assert [written[0].count(f"{folder}/ complete") for folder in FOLDERS] == [1, 0, 0, 0]
    assert [written[1].count(f"{folder}/ complete") for folder in FOLDERS] == [0, 1, 1, 1]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)
