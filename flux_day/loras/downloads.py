"""A LoRA reference → the one file it names: resolved per service, fetched once among all processes
sharing the disk cache, unpacked from a trained model's .tar, checked as safetensors. An unversioned
reference is resolved first (a redirect or an API answer, no body): a new version is fetched, an old
one taken from the cache."""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from huggingface_hub import HfApi, hf_hub_url

from flux_day.config import Credentials, Settings, credentials
from flux_day.errors import LoraError
from flux_day.filelocks import LockTimeout
from flux_day.loras.archive import extract_lora, is_archive
from flux_day.loras.cache import LoraCache
from flux_day.loras.fetch import DOWNLOAD_DEADLINE_S, Fetcher
from flux_day.loras.refs import LoraRef, shown_source
from flux_day.loras.safetensors_file import check_lora_file
from flux_day.weights.download import hub_refusal

log = logging.getLogger("flux_day.loras.manager")  # one log for reading LoRAs, whichever step
FILL_WAIT_S = DOWNLOAD_DEADLINE_S + 120  # the longest another process's download of a LoRA can take
PREFERRED_HF_FILES = ("pytorch_lora_weights.safetensors", "lora.safetensors")


class FilePlan(NamedTuple):
    """What to download for a reference, and under which cache key."""

    url: str
    key: str


class LoraDownloads:
    """The fetcher and the disk cache it fills."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.fetcher = Fetcher(settings)
        self.cache = LoraCache(settings.lora_cache, settings.lora_cache_bytes)

    @contextmanager
    def cached_file(self, ref: LoraRef) -> Iterator[Path]:
        """The ready .safetensors for `ref` in the disk cache, downloaded when absent (once among the
        processes sharing the cache), kept from eviction until the block ends."""
        tokens = credentials()  # read once, so a rotated token is used without a restart
        plan, fetched = self.plan(ref, tokens), []

        def fetch(partial: Path) -> None:
            fetched.append(partial)
            self.fetcher.download(ref, plan.url, partial, tokens)
            if is_archive(partial):  # both files are named as partials: a failure removes both
                tar = partial.rename(f"{partial}.tar")
                with partial.open("wb") as target:
                    member = extract_lora(tar, target, self.settings.max_lora_bytes)
                log.info("%s: took %s from the archive", ref.shown, member)
                tar.unlink()
            check_lora_file(partial)

        def waiting() -> None:
            log.info("%s: another process is downloading it; waiting", ref.shown)

        try:
            with self.cache.filled(plan.key, fetch, FILL_WAIT_S, waiting) as path:
                if not fetched:
                    log.info("%s: from the LoRA cache", ref.shown)
                yield path
        except LockTimeout:
            raise LoraError(
                f"another replica has been downloading {ref.shown} into the LoRA cache "
                f"for over {FILL_WAIT_S} s; try again later."
            ) from None

    def plan(self, ref: LoraRef, tokens: Credentials | None = None) -> FilePlan:
        """Resolve `ref` to a file URL; only unversioned service references touch the network here."""
        services = {"replicate": self._replicate, "huggingface": self._hugging_face, "civitai": self._civitai}
        resolve = services.get(ref.kind)
        return resolve(ref, tokens or credentials()) if resolve else FilePlan(ref.location, ref.identity)

    def _replicate(self, ref: LoraRef, tokens: Credentials) -> FilePlan:
        """`owner/model[/versions/v]/_weights` redirects to the file; unversioned, that redirect names
        the current version's file, which keys the cache."""
        version = f"/versions/{ref.version}" if ref.version else ""
        url = f"{self.settings.replicate_url}/{ref.owner}/{ref.name}{version}/_weights"
        if ref.version:
            return FilePlan(url, ref.identity)
        with self.fetcher.open(ref, url, tokens, follow=False) as response:
            location = response.headers.get("location") if response.is_redirect else None
        target = urllib.parse.urljoin(url, location) if location else url
        return FilePlan(target, f"url:{target}")

    def _hugging_face(self, ref: LoraRef, tokens: Credentials) -> FilePlan:
        """The file's URL pinned to the commit `huggingface_hub` listed."""
        repo_id, endpoint = f"{ref.owner}/{ref.name}", self.settings.hf_endpoint
        try:  # token False: never a token stored on disk by `hf auth login`
            info = HfApi(endpoint=endpoint, token=tokens.hugging_face or False).model_info(
                repo_id, revision=ref.version or None
            )
        except Exception as error:  # network failures come as several library types; none is worth naming
            kind, status = hub_refusal(error) or ("", None)
            problem = {
                "": "could not be listed (the request failed); try again",
                "gated": "is gated: accept its terms on Hugging Face and give the server an HF_TOKEN",
                "no repo": "was not found, or is private and HF_TOKEN cannot read it",
                "no revision": f"has no revision {ref.version!r}",
                "token": f"refused the server's HF_TOKEN (HTTP {status}); give it a valid token that can "
                "read the repo",
            }.get(kind, f"could not be listed (HTTP {status}); try again")
            raise _hf_error(ref, problem) from None
        filename = _pick_hf_file(ref, [sibling.rfilename for sibling in info.siblings or []])
        url = hf_hub_url(repo_id, filename, revision=info.sha, endpoint=endpoint)
        return FilePlan(url, f"huggingface:{repo_id}@{info.sha}/{filename}")

    def _civitai(self, ref: LoraRef, tokens: Credentials) -> FilePlan:
        """Its API picks the version (given, else the newest) and that version's SafeTensor file."""
        api = f"{self.settings.civitai_url}/api/v1/models/{ref.name}"
        with self.fetcher.open(ref, api, tokens) as response:
            try:
                model = response.json()
            except ValueError:
                raise LoraError(
                    f"{shown_source(api)} did not answer with JSON for {ref.shown}; check the reference."
                ) from None
        versions: list[dict[str, Any]] = model.get("modelVersions") or [] if isinstance(model, dict) else []
        if ref.version and not (versions := [v for v in versions if str(v.get("id")) == ref.version]):
            raise LoraError(f"CivitAI model {ref.name} has no version {ref.version}.")
        if not versions:
            raise LoraError(f"CivitAI model {ref.name} lists no versions to download.")
        version = max(versions, key=lambda v: str(v.get("createdAt") or ""))
        files = [
            f
            for f in version.get("files") or []
            if (f.get("metadata") or {}).get("format") == "SafeTensor" and f.get("downloadUrl")
        ]
        if not files:
            raise LoraError(
                f"CivitAI model {ref.name} version {version.get('id')} has no SafeTensor file "
                "(pickled files are never loaded); pick a version that offers one."
            )
        chosen = min(files, key=lambda f: (f.get("type") != "Model", not f.get("primary")))
        return FilePlan(chosen["downloadUrl"], f"civitai:{version.get('id')}/{chosen.get('name')}")


def _pick_hf_file(ref: LoraRef, files: list[str]) -> str:
    if ref.path:
        if ref.path not in files:
            raise _hf_error(ref, f"has no file {ref.path!r}")
        return ref.path
    weights = [name for name in files if name.endswith(".safetensors")]
    preferred = [name for name in weights if name.rsplit("/", 1)[-1] in PREFERRED_HF_FILES]
    named = preferred or [name for name in weights if "lora" in name.rsplit("/", 1)[-1].lower()]
    if len(weights) == 1 or len(named) == 1:
        return (weights if len(weights) == 1 else named)[0]
    if not weights:
        raise _hf_error(ref, "holds no .safetensors file")
    listed = ", ".join((named or weights)[:6])
    where = "huggingface.co/owner/repo/blob/main/<file>"
    raise _hf_error(ref, f"holds several .safetensors files ({listed}); name one as {where}")


def _hf_error(ref: LoraRef, problem: str) -> LoraError:
    return LoraError(f"the Hugging Face repo {ref.shown} {problem}.")
