"""What the Hugging Face Hub client raises, as one `WeightsError` naming the repo, the file and the fix."""

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


@contextmanager
def hub_errors(source: Source, endpoint: str, token: str | bool, path: str | None = None) -> Iterator[None]:
    """Turn what the Hub client raises into a `WeightsError` that names the repo and the fix."""
    what = f"{path} of {source.repo_id}" if path else f"the file list of {source.repo_id}"
    where = f"{endpoint}/{source.repo_id}"
    try:
        yield
    except GatedRepoError as error:
        fix = (
            f"the account of HF_TOKEN has no access: accept its license at {where}"
            if token
            else f"accept its license at {where} and set HF_TOKEN to a token of that account"
        )
        raise WeightsError(f"{source.repo_id} is gated: {fix}, then {RUN_AGAIN}.") from error
    except RepositoryNotFoundError as error:
        raise WeightsError(
            f"{endpoint} answered that {source.repo_id} does not exist or is private ({_token_fix(token)})."
        ) from error
    except RevisionNotFoundError as error:
        raise WeightsError(
            f"{source.repo_id} has no revision {source.revision!r} at {endpoint}; the manifest "
            "(flux_day/weights/manifest.py) names it."
        ) from error
    except RemoteEntryNotFoundError as error:
        raise WeightsError(f"{what} is listed but cannot be fetched (not found); {RUN_AGAIN}.") from error
    except OfflineModeIsEnabled as error:
        raise WeightsError(
            f"HF_HUB_OFFLINE is set, so {what} cannot be downloaded; unset it and {RUN_AGAIN}."
        ) from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise WeightsError(
                f"{endpoint} refused {what} with HTTP {status} ({_token_fix(token)})."
            ) from error
        raise WeightsError(f"{endpoint} answered HTTP {status} for {what}; {RUN_AGAIN}.") from error
    except (httpx2.HTTPError, OSError) as error:
        reason = _SIGNED_QUERY.sub(r"\1?…", str(error))  # CDN links are signed: keep the signature out
        raise WeightsError(
            f"Downloading {what} from {endpoint} failed ({type(error).__name__}: {reason}); {RUN_AGAIN}."
        ) from error


def _token_fix(token: str | bool) -> str:
    return "HF_TOKEN cannot read it" if token else "no HF_TOKEN was set; set one that can read it"
