"""Fetching the manifest's base weights from the Hugging Face Hub into the weights layout, verified.

(About 320 lines: listing, locking, staging and moving a folder into place are one transaction; the
checksums and the Hub's errors live beside it, in `checksums` and `hub_errors`.)

`ensure_weights(settings)` leaves every folder of the manifest complete under `settings.weights`, or
raises `WeightsError` saying what is wrong and how to fix it. A folder that is already there (all its
`required` files present) is left alone and costs no request; with `settings.offline` a missing one is
an error, never a download.

A folder is downloaded into a staging copy inside the weights root (`.flux-day-download/<folder>/`),
one file at a time with `huggingface_hub.hf_hub_download` pinned to the commit the Hub's listing
resolved, and each file is checked against the checksum that listing reports (sha256 for LFS files,
the git blob id for the others). Only when every file of the folder has passed is the staging copy
renamed into place, in one `os.replace`: a download that is killed, cut off or refused never leaves a
folder that looks complete, and `has_base_models` stays False until dev and schnell are both done.

Resuming: a connection dropped mid-file is resumed by the Hub client itself with a Range request.
Files already finished in the staging copy survive a killed process and are not fetched again (they
are checked again); a file that was half-way through when the process died starts over, because
huggingface_hub 2.x downloads each file to a process-unique temporary name.

Several processes on one weights root (replicas sharing a volume, or the download Job beside a
server): each folder is written by the one process holding its lock, so no two processes write one
staging copy, a process that starts while another downloads leaves that download alone, and replicas
starting together fetch different folders side by side (see `_claim`).

Credentials: `HF_TOKEN` is read from the environment at each call and handed to each Hub call
(`token=False` without one, so no stored login is used); the Hub client sends it to the Hub's own
origin only, never to the CDN its files redirect to. It is never logged nor put in a message.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Final

from huggingface_hub import HfApi, hf_hub_download

from flux_day import filelocks
from flux_day.config import Settings, credentials
from flux_day.errors import WeightsError
from flux_day.models import MODELS
from flux_day.weights.checksums import mismatch
from flux_day.weights.hub_errors import RUN_AGAIN, hub_errors
from flux_day.weights.layout import NSFW_CLASSIFIER_FOLDER, SAFETY_CHECKER_FOLDER
from flux_day.weights.manifest import MANIFEST, Source, folders

log = logging.getLogger(__name__)

STAGING = ".flux-day-download"  # under the weights root: same filesystem, so the final rename is atomic
SOURCE_RECORD = ".flux-day-source.json"  # written into each downloaded folder: repo, commit, checksums
# What each folder weighs on disk (the Hub's listing at the manifest's revisions, rounded), for the
# notice before a download: dev's transformer 23.8 + T5 9.5 + CLIP and VAE 0.4; schnell's transformer.
APPROXIMATE_GB: Final[dict[str, float]] = {
    MODELS["dev"].folder: 34,
    MODELS["schnell"].folder: 24,
    SAFETY_CHECKER_FOLDER: 1.2,
    NSFW_CLASSIFIER_FOLDER: 0.35,
}
_HUB_CACHE = ".cache"  # huggingface_hub's bookkeeping inside a local_dir; not moved into place


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo as the Hub's listing describes it."""

    path: str
    size: int | None
    sha256: str | None  # LFS files
    blob_id: str | None  # git object id: the checksum of non-LFS files


@dataclass(frozen=True)
class Plan:
    """A manifest row resolved against the Hub: the commit and the files to fetch from it."""

    source: Source
    commit: str
    files: tuple[RemoteFile, ...]


def ensure_weights(settings: Settings, manifest: Sequence[Source] = MANIFEST) -> None:
    """Make every folder of `manifest` complete under `settings.weights`, downloading what is missing.

    No request is made when nothing is missing. Raises `WeightsError` when something is missing and
    `settings.offline` is set, and when a download fails or a file fails its checksum.
    """
    root = Path(settings.weights)
    missing = missing_folders(root, manifest)
    if not missing:
        return
    if settings.offline:
        raise WeightsError(offline_message(root, missing))
    log.warning("weights: %s Downloading them now.", download_notice(root, missing))
    token = credentials().hugging_face or False
    rows = folders(tuple(manifest))
    try:
        (root / STAGING).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WeightsError(
            f"Cannot create {root / STAGING} to download base weights into ({error.strerror or error}); "
            "set FLUX_DAY_WEIGHTS to a folder this process can write."
        ) from error
    while missing := missing_folders(root, manifest):
        with _claim(root, missing) as folder:
            if folder in missing_folders(root, manifest):  # not completed by another process meanwhile
                _download_folder(root, folder, rows[folder], settings.hf_endpoint, token)


@contextmanager
def _claim(root: Path, missing: Sequence[str]) -> Iterator[str]:
    """Lock a missing folder that no other process is downloading, else wait for the first one's lock.

    Each folder has its own lock, `.flux-day-download/<folder>.lock`, held by the one process that
    writes its staging copy: replicas starting together on an empty volume fetch different folders side
    by side, and one whose folders are all taken waits, then finds them complete. A staging copy left
    by a process that died is resumed by the next holder of its lock. The locks are `flux_day.filelocks`
    (what they assume of the filesystem is said there); a lock file exists only while it is held.
    """
    for folder in missing:
        with filelocks.hold(root / STAGING / f"{folder}.lock", wait=False) as held:
            if held is not None:
                try:
                    yield folder
                finally:
                    held.unlink()
                return

    def waiting() -> None:
        log.info("weights: another process is downloading %s/ into %s; waiting for it", missing[0], root)

    with filelocks.hold(root / STAGING / f"{missing[0]}.lock", on_wait=waiting) as held:
        assert held is not None  # waited for
        try:
            yield missing[0]
        finally:
            held.unlink()


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
        if MODELS["dev"].folder in missing
        else ""
    )
    return (
        f"Base weights are missing under {root} ({', '.join(f'{f}/' for f in missing)}): about "
        f"{size:.0f} GB to download from the Hugging Face Hub.{gated}"
    )


def offline_message(root: Path, missing: Sequence[str]) -> str:
    """The one sentence that says which folders are missing and the command that fills them."""
    names = ", ".join(f"{folder}/" for folder in missing)
    quoted = shlex.quote(str(root))
    return (
        f"Base weights are missing under {root} ({names}) and FLUX_DAY_OFFLINE=1 forbids downloading "
        f"them: fill them with `FLUX_DAY_WEIGHTS={quoted} python scripts/download_weights.py` "
        f"(or `python scripts/download_weights.py --weights {quoted}`)."
    )


def _local_files(folder: Path) -> list[str]:
    """Files under `folder` as posix paths relative to it (none if it is not a directory)."""
    if not folder.is_dir():
        return []
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def _download_folder(
    root: Path, folder: str, rows: Sequence[Source], endpoint: str, token: str | bool
) -> None:
    started = time.monotonic()
    staging = root / STAGING / folder
    plans = [_plan(row, endpoint, token) for row in rows]
    _check_no_overlap(folder, plans)
    fetched = 0
    for plan in plans:
        for remote in plan.files:
            fetched += _download_file(plan, remote, staging, endpoint, token)
    _prune(staging, {remote.path for plan in plans for remote in plan.files})
    (staging / SOURCE_RECORD).write_text(json.dumps(_record(plans), indent=2) + "\n")
    _move_into_place(staging, root / folder)
    total = sum(remote.size or 0 for plan in plans for remote in plan.files)
    seconds = time.monotonic() - started
    log.info(
        "weights: %s/ complete: %d files, %s (%s downloaded) from %s in %.1fs",
        folder,
        sum(len(plan.files) for plan in plans),
        _human(total),
        _human(fetched),
        ", ".join(f"{plan.source.repo_id}@{plan.commit[:12]}" for plan in plans),
        seconds,
    )


def _plan(source: Source, endpoint: str, token: str | bool) -> Plan:
    """Resolve `source` on the Hub: its commit, and the files it fetches with their checksums."""
    with hub_errors(source, endpoint, token):
        info = HfApi(endpoint=endpoint).model_info(
            source.repo_id, revision=source.revision, files_metadata=True, token=token
        )
    if not info.sha:
        raise WeightsError(f"{endpoint} did not say which commit {source.repo_id}@{source.revision} is.")
    files = tuple(
        RemoteFile(
            path=sibling.rfilename,
            size=sibling.size,
            sha256=sibling.lfs.sha256 if sibling.lfs else None,
            blob_id=sibling.blob_id,
        )
        for sibling in info.siblings or ()
        if source.wants(sibling.rfilename)
    )
    for pattern in source.required:
        if not any(fnmatchcase(remote.path, pattern) for remote in files):
            raise WeightsError(
                f"{source.repo_id}@{source.revision} (commit {info.sha}) has no file matching {pattern!r} "
                f"among the files {source.folder}/ takes from it ({', '.join(source.allow)}); the "
                "manifest (flux_day/weights/manifest.py) no longer matches the repo."
            )
    return Plan(source, info.sha, files)


def _check_no_overlap(folder: str, plans: Sequence[Plan]) -> None:
    seen: dict[str, str] = {}
    for plan in plans:
        for remote in plan.files:
            if remote.path in seen:
                raise WeightsError(
                    f"{folder}/{remote.path} would come from both {seen[remote.path]} and "
                    f"{plan.source.repo_id}; the manifest must name one."
                )
            seen[remote.path] = plan.source.repo_id


def _download_file(plan: Plan, remote: RemoteFile, staging: Path, endpoint: str, token: str | bool) -> int:
    """Fetch one file into `staging` (kept if already there and unchanged) and verify it; return
    the bytes downloaded."""
    local = staging.joinpath(*remote.path.split("/"))
    already_there = local.is_file()
    with hub_errors(plan.source, endpoint, token, remote.path):
        hf_hub_download(
            plan.source.repo_id,
            remote.path,
            revision=plan.commit,  # every file from the one commit the listing described
            local_dir=staging,
            endpoint=endpoint,
            token=token,
        )
    _verify(local, remote, plan)
    return 0 if already_there else remote.size or 0


def _verify(local: Path, remote: RemoteFile, plan: Plan) -> None:
    """Check `local` against the Hub's checksum; delete it and raise `WeightsError` if it differs."""
    problem = mismatch(local, remote.size, remote.sha256, remote.blob_id)
    if problem is None:
        local.unlink()
        raise WeightsError(
            f"The Hub reported no size or checksum for {remote.path} in {plan.source.repo_id}@{plan.commit}, "
            "so it cannot be verified; it was not kept."
        )
    if problem:
        local.unlink()
        raise WeightsError(
            f"{plan.source.folder}/{remote.path} downloaded from {plan.source.repo_id}@{plan.commit} failed "
            f"its checksum ({problem}); the file was deleted: {RUN_AGAIN}."
        )


def _prune(staging: Path, keep: set[str]) -> None:
    """Drop the Hub client's bookkeeping and any file the plan does not name (left by an earlier run
    against another commit), so the folder moved into place holds exactly the verified files."""
    shutil.rmtree(staging / _HUB_CACHE, ignore_errors=True)
    for relative in _local_files(staging):
        if relative not in keep:
            (staging / relative).unlink()
    for directory in sorted((p for p in staging.rglob("*") if p.is_dir()), reverse=True):
        if not any(directory.iterdir()):
            directory.rmdir()


def _record(plans: Sequence[Plan]) -> dict[str, object]:
    return {
        "sources": [
            {
                "repo_id": plan.source.repo_id,
                "revision": plan.source.revision,
                "commit": plan.commit,
                "files": {
                    remote.path: {
                        "size": remote.size,
                        **({"sha256": remote.sha256} if remote.sha256 else {"git_blob_id": remote.blob_id}),
                    }
                    for remote in plan.files
                },
            }
            for plan in plans
        ]
    }


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename the verified staging folder to `target` in one step. An incomplete `target` (files
    missing) is moved aside first and deleted after."""
    aside = None
    if target.exists():
        aside = staging.with_name(f"{staging.name}.replaced")
        shutil.rmtree(aside, ignore_errors=True)
        log.warning("weights: %s is incomplete; replacing it with the downloaded copy", target)
        os.replace(target, aside)
    os.replace(staging, target)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _human(size: int) -> str:
    """Bytes in decimal units, as the Hub shows file sizes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"
