"""The manifest's base weights fetched from the Hugging Face Hub into the weights layout, verified.

Each folder is staged on the weights root's filesystem (`.flux-day-download/<folder>/`), every file
pinned to the commit the Hub's listing resolved and checked against that listing's sha256 (LFS) or git
blob id, then renamed into place whole (`filelocks.publish`: replicas fetch folders side by side).
A killed download resumes: verified files are kept, a dropped connection continues with a Range.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import shutil
import time
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import NamedTuple

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.hf_api import RepoSibling

from flux_day import filelocks
from flux_day.config import Settings, credentials
from flux_day.errors import WeightsError
from flux_day.models import MODELS
from flux_day.weights.hub_errors import RUN_AGAIN, hub_errors
from flux_day.weights.layout import DEV_FOLDER, NSFW_CLASSIFIER_FOLDER, SAFETY_CHECKER_FOLDER, SCHNELL_FOLDER
from flux_day.weights.manifest import MANIFEST, Source, folders

log = logging.getLogger(__name__)

STAGING = ".flux-day-download"  # under the weights root: same filesystem, so the final rename is atomic
SOURCE_RECORD = ".flux-day-source.json"  # written into each downloaded folder: repo, commit, checksums
# Each folder's size on the Hub (dev: transformer 23.8 + T5 9.5 + CLIP and VAE 0.4), for the notice.
APPROXIMATE_GB = {
    DEV_FOLDER: 34,
    SCHNELL_FOLDER: 24,
    SAFETY_CHECKER_FOLDER: 1.2,
    NSFW_CLASSIFIER_FOLDER: 0.35,
}
_HUB_CACHE = ".cache"  # huggingface_hub's bookkeeping inside a local_dir; not moved into place


class Plan(NamedTuple):
    """A manifest row resolved against the Hub: the commit and the listed files to fetch from it."""

    source: Source
    commit: str
    files: tuple[RepoSibling, ...]


def ensure_weights(settings: Settings, manifest: Sequence[Source] = MANIFEST) -> None:
    """Make every folder of `manifest` complete under `settings.weights` (no request when none is
    missing), or raise `WeightsError`: offline with a folder missing, a failed download or checksum."""
    root = Path(settings.weights)
    missing = missing_folders(root, manifest)
    if not missing:
        return
    if settings.offline:
        quoted, names = shlex.quote(str(root)), ", ".join(f"{folder}/" for folder in missing)
        raise WeightsError(
            f"Base weights are missing under {root} ({names}) and FLUX_DAY_OFFLINE=1 forbids downloading "
            f"them: fill them with `FLUX_DAY_WEIGHTS={quoted} python scripts/download_weights.py` "
            f"(or `python scripts/download_weights.py --weights {quoted}`)."
        )
    log.warning("weights: %s Downloading them now.", download_notice(root, missing))
    token = credentials().hugging_face or False  # False: never a login stored on disk
    rows = folders(tuple(manifest))
    try:
        (root / STAGING).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WeightsError(
            f"Cannot create {root / STAGING} to download base weights into ({error.strerror or error}); "
            "set FLUX_DAY_WEIGHTS to a folder this process can write."
        ) from error

    def claim(folder: str, wait: bool) -> bool | None:
        """Download `folder` unless another process holds it (and not `wait`) or completed it."""
        return filelocks.publish(
            root / folder,
            lambda staging: _download_folder(staging, rows[folder], settings.hf_endpoint, token),
            lock=root / STAGING / f"{folder}.lock",
            partial=root / STAGING / folder,
            missing=lambda: folder in missing_folders(root, manifest),
            wait=wait,
            on_wait=lambda: log.info(
                "weights: another process is downloading %s/ into %s; waiting for it", folder, root
            ),
        )

    while missing := missing_folders(root, manifest):
        if all(claim(folder, wait=False) is None for folder in missing):
            claim(missing[0], wait=True)  # every missing folder is taken: wait for the first


def missing_folders(root: Path, manifest: Sequence[Source] = MANIFEST) -> list[str]:
    """The manifest's folders under `root` that are absent or lack one of their `required` files."""
    missing = []
    for folder, rows in folders(tuple(manifest)).items():
        present = _local_files(root / folder)
        required = [pattern for row in rows for pattern in row.required]
        if not present or not all(any(fnmatchcase(p, pattern) for p in present) for pattern in required):
            missing.append(folder)
    return missing


def download_notice(root: Path, missing: Sequence[str]) -> str:
    """What a download of `missing` means, said before it starts: the folder, the size, the licence."""
    size = sum(APPROXIMATE_GB.get(folder, 0) for folder in missing)
    gated = (
        f" FLUX.1 [dev] is gated: accept its licence at https://huggingface.co/{MODELS['dev'].repo_id} "
        "and set HF_TOKEN to a token of that account."
        if DEV_FOLDER in missing
        else ""
    )
    return (
        f"Base weights are missing under {root} ({', '.join(f'{f}/' for f in missing)}): about "
        f"{size:.0f} GB to download from the Hugging Face Hub.{gated}"
    )


def _local_files(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def _download_folder(staging: Path, rows: Sequence[Source], endpoint: str, token: str | bool) -> None:
    """Fill `staging` with the verified files of `rows` and their record (the caller moves it into place)."""
    started = time.monotonic()
    plans = [_plan(row, endpoint, token) for row in rows]
    origin: dict[str, str] = {}
    for plan in plans:
        for remote in plan.files:
            if origin.setdefault(remote.rfilename, plan.source.repo_id) != plan.source.repo_id:
                raise WeightsError(
                    f"{plan.source.folder}/{remote.rfilename} would come from both "
                    f"{origin[remote.rfilename]} and {plan.source.repo_id}; the manifest must name one."
                )
    fetched = sum(
        _download_file(plan, remote, staging, endpoint, token) for plan in plans for remote in plan.files
    )
    # Drop the client's bookkeeping and files no plan names (an earlier run's, of another commit).
    shutil.rmtree(staging / _HUB_CACHE, ignore_errors=True)
    for relative in set(_local_files(staging)) - set(origin):
        (staging / relative).unlink()
    for directory in sorted((p for p in staging.rglob("*") if p.is_dir()), reverse=True):
        if not any(directory.iterdir()):
            directory.rmdir()
    record = [
        {"repo_id": plan.source.repo_id, "revision": plan.source.revision, "commit": plan.commit}
        | {"files": dict(map(_checksum, plan.files))}
        for plan in plans
    ]
    (staging / SOURCE_RECORD).write_text(json.dumps({"sources": record}, indent=2) + "\n")
    target = staging.parents[1] / rows[0].folder
    if target.exists():
        log.warning("weights: %s is incomplete; replacing it with the downloaded copy", target)
    log.info(
        "weights: %s/ complete: %d files, %s (%s downloaded) from %s in %.1fs",
        rows[0].folder,
        len(origin),
        _human(sum(remote.size or 0 for plan in plans for remote in plan.files)),
        _human(fetched),
        ", ".join(f"{plan.source.repo_id}@{plan.commit[:12]}" for plan in plans),
        time.monotonic() - started,
    )


def _plan(source: Source, endpoint: str, token: str | bool) -> Plan:
    """Resolve `source` on the Hub: its commit, and the files it fetches with their checksums."""
    with hub_errors(source, endpoint, token):
        info = HfApi(endpoint=endpoint).model_info(
            source.repo_id, revision=source.revision, files_metadata=True, token=token
        )
    if not info.sha:
        raise WeightsError(f"{endpoint} did not say which commit {source.repo_id}@{source.revision} is.")
    files = tuple(sibling for sibling in info.siblings or () if source.wants(sibling.rfilename))
    for pattern in source.required:
        if not any(fnmatchcase(remote.rfilename, pattern) for remote in files):
            raise WeightsError(
                f"{source.repo_id}@{source.revision} (commit {info.sha}) has no file matching {pattern!r} "
                f"among the files {source.folder}/ takes from it ({', '.join(source.allow)}); the "
                "manifest (flux_day/weights/manifest.py) no longer matches the repo."
            )
    return Plan(source, info.sha, files)


def _download_file(plan: Plan, remote: RepoSibling, staging: Path, endpoint: str, token: str | bool) -> int:
    """Fetch one file into `staging` (kept if there and unchanged), verify it; the bytes downloaded."""
    local = staging.joinpath(*remote.rfilename.split("/"))
    already_there = local.is_file()
    with hub_errors(plan.source, endpoint, token, remote.rfilename):
        hf_hub_download(
            plan.source.repo_id,
            remote.rfilename,
            revision=plan.commit,  # every file from the one commit the listing described
            local_dir=staging,
            endpoint=endpoint,
            token=token,
        )
    _verify(local, remote, plan)
    return 0 if already_there else remote.size or 0


def _checksum(remote: RepoSibling) -> tuple[str, dict[str, object]]:
    checksum = {"sha256": remote.lfs.sha256} if remote.lfs else {"git_blob_id": remote.blob_id}
    return remote.rfilename, {"size": remote.size, **checksum}


def _verify(local: Path, remote: RepoSibling, plan: Plan) -> None:
    """Check `local` against the Hub's size and checksum; delete it and raise `WeightsError` if it differs."""
    size, expected = local.stat().st_size, remote.lfs.sha256 if remote.lfs else remote.blob_id
    problem = f"it has {size} bytes, the Hub says {remote.size}" if remote.size not in (None, size) else ""
    if not problem and expected:
        with local.open("rb") as file:  # a git blob id is the sha1 of `blob <size>\0` + the bytes
            blob = lambda: hashlib.sha1(b"blob %d\0" % size)  # noqa: E731
            digest = hashlib.file_digest(file, "sha256" if remote.lfs else blob).hexdigest()
        name = "sha256" if remote.lfs else "git blob id"
        problem = "" if digest == expected else f"{name} {digest}, the Hub says {expected}"
    elif remote.size is None:
        local.unlink()
        raise WeightsError(
            f"The Hub reported no size or checksum for {remote.rfilename} in "
            f"{plan.source.repo_id}@{plan.commit}, so it cannot be verified; it was not kept."
        )
    if problem:
        local.unlink()
        raise WeightsError(
            f"{plan.source.folder}/{remote.rfilename} downloaded from {plan.source.repo_id}@{plan.commit} "
            f"failed its checksum ({problem}); the file was deleted: {RUN_AGAIN}."
        )


def _human(size: int) -> str:
    """Bytes in decimal units, as the Hub shows file sizes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"
