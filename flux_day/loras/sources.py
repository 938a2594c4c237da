"""A LoRA reference → the one file to download, its cache key and the token its host may see.

Replicate: `{FLUX_DAY_REPLICATE_URL}/owner/model[/versions/v]/_weights`, which redirects to the
weights. Hugging Face: `huggingface_hub` lists the repo (at `HF_ENDPOINT`, `HF_TOKEN` passed per
call) and builds the file URL, pinned to the commit it listed. CivitAI: its models API picks the
version (given, else newest) and its SafeTensor file. Versioned references are cache keys as they
stand; an unversioned one is resolved first (a redirect or an API answer, no body), so a newly trained
version is fetched while an unchanged one comes from the cache.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from typing import Any

from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from flux_day.config import Settings
from flux_day.errors import LoraError
from flux_day.loras.fetch import Credential, Fetcher
from flux_day.loras.refs import LoraRef

PREFERRED_HF_FILES = ("pytorch_lora_weights.safetensors", "lora.safetensors")


@dataclass(frozen=True)
class FilePlan:
    """What to download for a reference, under which cache key, with which credential."""

    url: str
    key: str
    credential: Credential | None = None


def plan_file(ref: LoraRef, settings: Settings, fetcher: Fetcher) -> FilePlan:
    """Resolve `ref` to a file URL; only unversioned service references touch the network here."""
    if ref.kind == "replicate":
        return _replicate(ref, settings, fetcher)
    if ref.kind == "huggingface":
        return _hugging_face(ref, settings)
    if ref.kind == "civitai":
        return _civitai(ref, settings, fetcher)
    return FilePlan(ref.location, ref.identity, _credential_for(ref.location, settings))


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc.lower()


def _credential_for(url: str, settings: Settings) -> Credential | None:
    """The token of the service `url` belongs to, if any (a CivitAI download link, say)."""
    tokens = {
        _host(settings.replicate_url): os.environ.get("REPLICATE_API_TOKEN"),
        _host(settings.civitai_url): os.environ.get("CIVITAI_API_TOKEN"),
        _host(settings.hf_endpoint): os.environ.get("HF_TOKEN"),
    }
    token = tokens.get(_host(url))
    return Credential(_host(url), token) if token else None


def _replicate(ref: LoraRef, settings: Settings, fetcher: Fetcher) -> FilePlan:
    base = f"{settings.replicate_url}/{ref.owner}/{ref.name}"
    url = f"{base}/versions/{ref.version}/_weights" if ref.version else f"{base}/_weights"
    credential = _credential_for(url, settings)
    if ref.version:
        return FilePlan(url, ref.identity, credential)
    # Unversioned: the redirect names the current version's file, which keys the cache.
    with fetcher.open(ref, url, credential, follow=False) as response:
        location = response.headers.get("location") if response.is_redirect else None
    if location is None:
        return FilePlan(url, f"url:{url}", credential)
    target = urllib.parse.urljoin(url, location)
    return FilePlan(target, f"url:{target}", credential if _host(target) == _host(url) else None)


def _hugging_face(ref: LoraRef, settings: Settings) -> FilePlan:
    token = os.environ.get("HF_TOKEN") or False  # False: never a token stored on disk by `hf auth login`
    repo_id = f"{ref.owner}/{ref.name}"
    try:
        info = HfApi(endpoint=settings.hf_endpoint, token=token).model_info(
            repo_id, revision=ref.version or None
        )
    except GatedRepoError:
        raise _hf_error(
            ref, "is gated: accept its terms on Hugging Face and give the server an HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise _hf_error(ref, "was not found, or is private and HF_TOKEN cannot read it") from None
    except RevisionNotFoundError:
        raise _hf_error(ref, f"has no revision {ref.version!r}") from None
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status in {401, 403}:
            raise _hf_error(
                ref,
                f"refused the server's HF_TOKEN (HTTP {status}); give it a valid token that can read "
                "the repo",
            ) from None
        raise _hf_error(ref, f"could not be listed (HTTP {status}); try again") from None
    except Exception:  # network failures come as several library types; none is worth naming
        raise _hf_error(ref, "could not be listed (the request failed); try again") from None
    files = [sibling.rfilename for sibling in info.siblings or []]
    filename = _pick_hf_file(ref, files)
    url = hf_hub_url(repo_id, filename, revision=info.sha, endpoint=settings.hf_endpoint)
    return FilePlan(url, f"huggingface:{repo_id}@{info.sha}/{filename}", _credential_for(url, settings))


def _pick_hf_file(ref: LoraRef, files: list[str]) -> str:
    if ref.path:
        if ref.path not in files:
            raise _hf_error(ref, f"has no file {ref.path!r}")
        return ref.path
    weights = [name for name in files if name.endswith(".safetensors")]
    if len(weights) == 1:
        return weights[0]
    preferred = [name for name in weights if name.rsplit("/", 1)[-1] in PREFERRED_HF_FILES]
    named = preferred or [name for name in weights if "lora" in name.rsplit("/", 1)[-1].lower()]
    if len(named) == 1:
        return named[0]
    if not weights:
        raise _hf_error(ref, "holds no .safetensors file")
    listed = ", ".join((named or weights)[:6])
    raise _hf_error(
        ref,
        f"holds several .safetensors files ({listed}); name one as "
        "huggingface.co/owner/repo/blob/main/<file>",
    )


def _hf_error(ref: LoraRef, problem: str) -> LoraError:
    return LoraError(f"the Hugging Face repo {ref.shown} {problem}.")


def _civitai(ref: LoraRef, settings: Settings, fetcher: Fetcher) -> FilePlan:
    api = f"{settings.civitai_url}/api/v1/models/{ref.name}"
    model = fetcher.json(ref, api, _credential_for(api, settings))
    versions: list[dict[str, Any]] = model.get("modelVersions") or [] if isinstance(model, dict) else []
    if ref.version:
        versions = [v for v in versions if str(v.get("id")) == ref.version]
        if not versions:
            raise LoraError(f"CivitAI model {ref.name} has no version {ref.version}.")
    elif versions:
        versions = [max(versions, key=lambda v: str(v.get("createdAt") or ""))]
    if not versions:
        raise LoraError(f"CivitAI model {ref.name} lists no versions to download.")
    version = versions[0]
    files = [
        f
        for f in version.get("files") or []
        if (f.get("metadata") or {}).get("format") == "SafeTensor" and f.get("downloadUrl")
    ]
    files.sort(key=lambda f: (f.get("type") != "Model", not f.get("primary")))
    if not files:
        raise LoraError(
            f"CivitAI model {ref.name} version {version.get('id')} has no SafeTensor file "
            "(pickled files are never loaded); pick a version that offers one."
        )
    url = files[0]["downloadUrl"]
    return FilePlan(
        url, f"civitai:{version.get('id')}/{files[0].get('name')}", _credential_for(url, settings)
    )
