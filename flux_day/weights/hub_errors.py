"""The Hugging Face Hub client's errors, classified once for both of its callers (LoRA listings and the
base weights), and put in words for the base weights' operator."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import httpx2
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from flux_day.errors import WeightsError
from flux_day.weights.manifest import Source

RUN_AGAIN = "run `python scripts/download_weights.py` (or the command line with `--download`) to resume"
_SIGNED_QUERY = re.compile(r"(https?://[^\s?]+)\?[^\s)]*")
_KINDS = (  # a gated repo is also a RepositoryNotFoundError: first match wins
    (GatedRepoError, "gated"),
    (RepositoryNotFoundError, "no repo"),
    (RevisionNotFoundError, "no revision"),
    (RemoteEntryNotFoundError, "no file"),
    (OfflineModeIsEnabled, "offline"),
)


def hub_refusal(error: BaseException) -> tuple[str, int | None] | None:
    """(what the Hub refused, its HTTP status): "gated", "no repo", "no revision", "no file", "offline",
    "token" (HTTP 401/403) or "http"; None when `error` is no answer of the Hub (a network failure)."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    kind = next((kind for error_type, kind in _KINDS if isinstance(error, error_type)), None)
    if kind is None and isinstance(error, HfHubHTTPError):
        kind = "token" if status in (401, 403) else "http"
    return None if kind is None else (kind, status)


@contextmanager
def hub_errors(source: Source, endpoint: str, token: str | bool, path: str | None = None) -> Iterator[None]:
    """Turn what the Hub client raises into a `WeightsError` that names the repo and the fix."""
    repo_id = source.repo_id
    what = f"{path} of {repo_id}" if path else f"the file list of {repo_id}"
    token_fix = "HF_TOKEN cannot read it" if token else "no HF_TOKEN was set; set one that can read it"
    try:
        yield
    except Exception as error:
        kind, status = hub_refusal(error) or ("", None)
        if not kind and not isinstance(error, httpx2.HTTPError | OSError):
            raise
        where = f"{endpoint}/{repo_id}"
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
