"""The manifest's base weights fetched from the Hugging Face Hub, each file pinned to the commit the Hub's
listing resolved and checked against its sha256 (LFS) or git blob id. A folder is staged beside the root
and renamed into place whole (`filelocks.publish`: replicas share the work); a killed download resumes."""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub import errors as hub
from huggingface_hub.hf_api import RepoSibling
from huggingface_hub.utils.sha import git_hash, sha_fileobj

from flux_day import filelocks
from flux_day.config import Settings, credentials
from flux_day.errors import WeightsError
from flux_day.models import MODELS
from flux_day.weights.manifest import DEV_FOLDER, DOWNLOAD_GB, MANIFEST, Source

log = logging.getLogger(__name__)

STAGING = ".flux-day-download"  # under the weights root: same filesystem, so the final rename is atomic
SOURCE_RECORD = ".flux-day-source.json"  # written into each downloaded folder: repo, commit, checksums
RUN_AGAIN = "run `python scripts/download_weights.py` (or the command line with `--download`) to resume"
_SIGNED_QUERY = re.compile(r"(https?://[^\s?]+)\?[^\s)]*")
_KINDS = (  # a gated repo is also a RepositoryNotFoundError: first match wins
    (hub.GatedRepoError, "gated"),
    (hub.RepositoryNotFoundError, "no repo"),
    (hub.RevisionNotFoundError, "no revision"),
    (hub.RemoteEntryNotFoundError, "no file"),
    (hub.OfflineModeIsEnabled, "offline"),
)


def ensure_weights(settings: Settings, manifest: Sequence[Source] = MANIFEST) -> None:
    """Make every folder of `manifest` complete under `settings.weights` (no request when none is
    missing), or raise `WeightsError`: offline with a folder missing, a failed download or checksum."""
    root = settings.weights
    if not (missing := missing_folders(root, manifest)):
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
    rows = {row.folder: row for row in manifest}
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
    for row in manifest:
        present = _local_files(root / row.folder)
        if not present or not all(any(fnmatchcase(p, pattern) for p in present) for pattern in row.required):
            missing.append(row.folder)
    return missing


def download_notice(root: Path, missing: Sequence[str]) -> str:
    """What a download of `missing` means, said before it starts: the folder, the size, the licence."""
    size = sum(DOWNLOAD_GB.get(folder, 0) for folder in missing)
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


def _download_folder(staging: Path, source: Source, endpoint: str, token: str | bool) -> None:
    """Fill `staging` with the verified files of `source` at the one commit the Hub's listing resolves, and
    their record; the caller moves it into place."""
    started = time.monotonic()
    with hub_errors(source, endpoint, token):
        api = HfApi(endpoint=endpoint)
        info = api.model_info(source.repo_id, revision=source.revision, files_metadata=True, token=token)
    if not (commit := info.sha):
        raise WeightsError(f"{endpoint} did not say which commit {source.repo_id}@{source.revision} is.")
    files = tuple(sibling for sibling in info.siblings or () if source.wants(sibling.rfilename))
    for pattern in source.required:
        if not any(fnmatchcase(remote.rfilename, pattern) for remote in files):
            raise WeightsError(
                f"{source.repo_id}@{source.revision} (commit {commit}) has no file matching {pattern!r} "
                f"among the files {source.folder}/ takes from it ({', '.join(source.allow)}); the "
                "manifest (flux_day/weights/manifest.py) no longer matches the repo."
            )
    fetched = sum(_download_file(source, commit, remote, staging, endpoint, token) for remote in files)
    # Drop the client's bookkeeping (.cache) and files not listed (an earlier run's, of another commit).
    shutil.rmtree(staging / ".cache", ignore_errors=True)
    for relative in set(_local_files(staging)) - {remote.rfilename for remote in files}:
        (staging / relative).unlink()
    for directory in sorted((p for p in staging.rglob("*") if p.is_dir()), reverse=True):
        if not any(directory.iterdir()):
            directory.rmdir()
    checksums = dict(map(_checksum, files))
    record = {"repo_id": source.repo_id, "revision": source.revision, "commit": commit, "files": checksums}
    (staging / SOURCE_RECORD).write_text(json.dumps({"sources": [record]}, indent=2) + "\n")
    if (target := staging.parents[1] / source.folder).exists():
        log.warning("weights: %s is incomplete; replacing it with the downloaded copy", target)
    log.info(
        "weights: %s/ complete: %d files, %s (%s downloaded) from %s@%s in %.1fs",
        source.folder,
        len(files),
        _human(sum(remote.size or 0 for remote in files)),
        _human(fetched),
        source.repo_id,
        commit[:12],
        time.monotonic() - started,
    )


def _download_file(
    source: Source, commit: str, remote: RepoSibling, staging: Path, endpoint: str, token: str | bool
) -> int:
    """Fetch one file into `staging` (kept if there and unchanged) and check it against the Hub's size and
    checksum, deleting it if it differs; return the bytes downloaded."""
    local, repo, name = staging.joinpath(*remote.rfilename.split("/")), source.repo_id, remote.rfilename
    already_there = local.is_file()
    with hub_errors(source, endpoint, token, name):
        hf_hub_download(repo, name, revision=commit, local_dir=staging, endpoint=endpoint, token=token)
    size, expected = local.stat().st_size, remote.lfs.sha256 if remote.lfs else remote.blob_id
    problem = f"it has {size} bytes, the Hub says {remote.size}" if remote.size not in (None, size) else ""
    if not problem and expected:
        with local.open("rb") as file:  # not LFS: a small file, hashed as git does
            digest = sha_fileobj(file).hex() if remote.lfs else git_hash(file.read())
        algorithm = "sha256" if remote.lfs else "git blob id"
        problem = "" if digest == expected else f"{algorithm} {digest}, the Hub says {expected}"
    elif remote.size is None:
        local.unlink()
        raise WeightsError(
            f"The Hub reported no size or checksum for {name} in {repo}@{commit}, so it cannot be "
            "verified; it was not kept."
        )
    if problem:
        local.unlink()
        raise WeightsError(
            f"{source.folder}/{name} downloaded from {repo}@{commit} failed its checksum "
            f"({problem}); the file was deleted: {RUN_AGAIN}."
        )
    return 0 if already_there else remote.size or 0


def _checksum(remote: RepoSibling) -> tuple[str, dict[str, object]]:
    checksum = {"sha256": remote.lfs.sha256} if remote.lfs else {"git_blob_id": remote.blob_id}
    return remote.rfilename, {"size": remote.size, **checksum}


def _human(size: int) -> str:
    """Bytes in decimal units, as the Hub shows file sizes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def hub_refusal(error: BaseException) -> tuple[str, int | None] | None:
    """(what the Hub refused, its HTTP status): "gated", "no repo", "no revision", "no file", "offline",
    "token" (HTTP 401/403) or "http"; None when `error` is no answer of the Hub (a network failure)."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    kind = next((kind for error_type, kind in _KINDS if isinstance(error, error_type)), None)
    if kind is None and isinstance(error, hub.HfHubHTTPError):
        kind = "token" if status in (401, 403) else "http"
    return None if kind is None else (kind, status)


@contextmanager
def hub_errors(source: Source, endpoint: str, token: str | bool, path: str | None = None) -> Iterator[None]:
    """Turn what the Hub client raises into a `WeightsError` that names the repo and the fix."""
    repo_id, where = source.repo_id, f"{endpoint}/{source.repo_id}"
    what = f"{path} of {repo_id}" if path else f"the file list of {repo_id}"
    token_fix = "HF_TOKEN cannot read it" if token else "no HF_TOKEN was set; set one that can read it"
    try:
        yield
    except Exception as error:
        kind, status = hub_refusal(error) or ("", None)
        if not kind and not isinstance(error, httpx2.HTTPError | OSError):
            raise
        access = f"accept its license at {where} and set HF_TOKEN to a token of that account"
        if token:
            access = f"the account of HF_TOKEN has no access: accept its license at {where}"
        message = {
            "gated": f"{repo_id} is gated: {access}, then {RUN_AGAIN}.",
            "no repo": f"{endpoint} answered that {repo_id} does not exist or is private ({token_fix}).",
            "no revision": f"{repo_id} has no revision {source.revision!r} at {endpoint}; the manifest "
            "(flux_day/weights/manifest.py) names it.",
            "no file": f"{what} is listed but cannot be fetched (not found); {RUN_AGAIN}.",
            "offline": f"HF_HUB_OFFLINE is set, so {what} cannot be downloaded; unset it and {RUN_AGAIN}.",
            "token": f"{endpoint} refused {what} with HTTP {status} ({token_fix}).",
            "http": f"{endpoint} answered HTTP {status} for {what}; {RUN_AGAIN}.",
        }.get(kind)
        if message is None:  # CDN links are signed: keep the signature out
            reason = _SIGNED_QUERY.sub(r"\1?…", str(error))
            message = (
                f"Downloading {what} from {endpoint} failed ({type(error).__name__}: {reason}); {RUN_AGAIN}."
            )
        raise WeightsError(message) from error
