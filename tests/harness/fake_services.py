"""Fake Replicate, Hugging Face and CivitAI: real HTTP servers on 127.0.0.1 that answer the requests our
LoRA fetcher makes the way those services do, as far as a client can see.

The fetcher resolves a model name to a file through each service's API, follows its redirects, sends
tokens and reads its JSON. Tests point FLUX_DAY_REPLICATE_URL, HF_ENDPOINT and FLUX_DAY_CIVITAI_URL at
these fakes (`FakeServices.env()`) and check what the predictor did, down to which Authorization
header reached which host (`HttpFiles.headers`). Like the real services, each fake answers its API on
one server and serves the files themselves from another (`cdn`: another port, so another origin, with
a "signed" query string), so a client that forwards a service's token to the CDN can be caught.

What each fake plays is what the real service answers for the requests a client makes; the details
that clients depend on are noted where they are built (the Hub's X-Repo-Commit / X-Linked-Etag headers,
its X-Error-Code values, CivitAI's newest-first version list, Replicate's redirect to a .tar).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import re
import tarfile
import threading
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal, Self

from tests.harness.http_files import HttpFiles, Request, Route

REPLICATE_MEMBER = "output/flux_train_replicate/lora.safetensors"
# Suffixes a Hub repo's default .gitattributes stores in LFS: those files resolve to a CDN redirect.
HF_LFS_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".tar", ".zip", ".gguf", ".onnx"}
)
CIVITAI_FORMATS = {
    ".safetensors": "SafeTensor",
    ".pt": "PickleTensor",
    ".ckpt": "PickleTensor",
    ".bin": "Other",
}
_MTIME = 1_714_521_600  # 2024-05-01: fixed, so the same members make the same archive


def make_tar(
    members: Mapping[str, bytes],
    links: Mapping[str, str] | None = None,
    hardlinks: Mapping[str, str] | None = None,
    extra: Iterable[tarfile.TarInfo] = (),
    compression: Literal["", "gz"] = "",
) -> bytes:
    """A tar archive, entries in this order: `members` (name → bytes), `links` (symlink name → target),
    `hardlinks` (name → the path it links to) and `extra` raw entries (directories, FIFOs, devices).

    Names are written exactly as given, so `../escape.safetensors`, `/abs/lora.safetensors` and links
    pointing out of the archive can be built for refusal tests.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}" if compression else "w") as tar:
        for name, data in members.items():
            tar.addfile(_tar_info(name, size=len(data)), io.BytesIO(data))
        for name, target in (links or {}).items():
            tar.addfile(_tar_info(name, kind=tarfile.SYMTYPE, target=target))
        for name, target in (hardlinks or {}).items():
            tar.addfile(_tar_info(name, kind=tarfile.LNKTYPE, target=target))
        for info in extra:
            tar.addfile(info)
    return buffer.getvalue()


def _tar_info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname, info.mode, info.mtime = size, kind, target, 0o644, _MTIME
    return info


def json_route(body: object, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Route:
    """`body` as a JSON response."""
    return Route(
        status=status,
        chunks=(json.dumps(body).encode(),),
        headers=(("Content-Type", "application/json; charset=utf-8"), *headers),
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_blob_sha1(data: bytes) -> str:
    """A file's git object id: what the Hub reports as `oid` and serves as ETag for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeService:
    """One service: `api` (an `HttpFiles`) answers its endpoints, `cdn` serves its files. Without a
    `cdn` given the service starts its own; a shared one is started and stopped by its owner."""

    def __init__(self, cdn: HttpFiles | None = None) -> None:
        self.api = HttpFiles()
        self._owns_cdn = cdn is None
        self.cdn = HttpFiles() if cdn is None else cdn
        self.gates: dict[str, threading.Event] = {}  # CDN path → event its body waits for

    @property
    def base(self) -> str:
        """The URL to configure as the service's address (no trailing slash)."""
        return self.api.base

    def __enter__(self) -> Self:
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.api)
            if self._owns_cdn:
                stack.enter_context(self.cdn)
            stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self.api.__exit__(*exc)
        if self._owns_cdn:
            self.cdn.__exit__(*exc)

    def _cdn_file(
        self, path: str, data: bytes, headers: tuple[tuple[str, str], ...] = (), ranges: bool = False
    ) -> str:
        """Serve `data` at `path` on the CDN (taking Range requests if `ranges`); return its URL with a
        signature-like query, as real CDN links carry (the CDN ignores it, but a client must not print it)."""
        self.cdn.add(
            path,
            Route(
                chunks=(data,),
                headers=(("Content-Type", "application/octet-stream"), *headers),
                ranges=ranges,
                gate=self.gates.get(path),
            ),
        )
        return f"{self.cdn.url(path)}?X-Amz-Expires=3600&X-Amz-Signature={_sha256(path.encode())[:24]}"


def _bearer_is(request: Request, token: str | None) -> bool:
    """True when no token is required, or `Authorization: Bearer <token>` was sent."""
    return token is None or request.authorization == f"Bearer {token}"


class FakeReplicate(FakeService):
    """`GET /{owner}/{model}/_weights` and `GET /{owner}/{model}/versions/{version}/_weights` answer a
    redirect (307 unless told) to the CDN URL of the weights: a .tar from the trainer, or a bare file.
    Unknown models answer 404; a private model 401 without `Authorization: Bearer <token>`."""

    _PATH = re.compile(r"^/(?P<owner>[^/]+)/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/_weights$")

    def __init__(self, cdn: HttpFiles | None = None, redirect_status: int = 307) -> None:
        super().__init__(cdn)
        self.redirect_status = redirect_status
        self.weights: dict[tuple[str, str, str], str] = {}  # (owner, model, version or "") → file URL
        self.tokens: dict[tuple[str, str], str] = {}
        self.api.handle("/", self._answer)

    def add_model(
        self,
        owner: str,
        model: str,
        data: bytes,
        version: str | None = None,
        as_tar: bool = True,
        member: str = REPLICATE_MEMBER,
        token: str | None = None,
    ) -> str:
        """Serve `data` as owner/model's LoRA: inside a `trained_model.tar` as `member` (what Replicate's
        trainer outputs), or bare, named after `member`. Returns the file's CDN URL."""
        if as_tar:
            return self.add_weights(
                owner, model, make_tar({member: data}), "trained_model.tar", version, token
            )
        return self.add_weights(owner, model, data, PurePosixPath(member).name, version, token)

    def add_weights(
        self,
        owner: str,
        model: str,
        body: bytes,
        filename: str = "trained_model.tar",
        version: str | None = None,
        token: str | None = None,
    ) -> str:
        """Serve `body` exactly (a tar from `make_tar`, say) as owner/model's weights, named `filename`.
        It answers for `version` if given, and for the bare `owner/model` (latest added wins).
        `token` makes the model private. Returns the file's CDN URL."""
        url = self._cdn_file(f"/replicate-delivery/{_sha256(body)[:32]}/{filename}", body)
        self.weights[(owner, model, "")] = url
        if version:
            self.weights[(owner, model, version)] = url
        if token is not None:
            self.tokens[(owner, model)] = token
        return url

    def weights_path(self, owner: str, model: str, version: str | None = None) -> str:
        """The API path a client asks for the weights of owner/model[/version]."""
        middle = f"/versions/{version}" if version else ""
        return f"/{owner}/{model}{middle}/_weights"

    def _answer(self, request: Request) -> Route | None:
        match = self._PATH.match(request.path)
        if match is None:
            return None
        owner, model = match["owner"], match["model"]
        url = self.weights.get((owner, model, match["version"] or ""))
        if url is None:
            return json_route({"detail": "Not found."}, status=404)
        if not _bearer_is(request, self.tokens.get((owner, model))):
            return json_route({"detail": "Authentication credentials were not provided."}, status=401)
        return Route(status=self.redirect_status, location=url)


@dataclass
class HfRepo:
    """A Hub model repo: its branches (and tags) by name, the files of each commit, and the token a
    private repo demands."""

    token: str | None = None
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def commit_of(self, revision: str) -> str | None:
        """A branch's commit, or the revision itself if it is a commit of this repo."""
        return self.branches.get(revision) or (revision if revision in self.commits else None)


def hub_error(status: int, code: str | None, message: str, commit: str | None = None) -> Route:
    """An error as the Hub sends it: `huggingface_hub` picks its exception from X-Error-Code
    (RepoNotFound → RepositoryNotFoundError, RevisionNotFound, EntryNotFound), not from the status."""
    headers = [("X-Error-Message", message)]
    if code is not None:
        headers.append(("X-Error-Code", code))
    if commit is not None:
        headers.append(("X-Repo-Commit", commit))
    return json_route({"error": message}, status=status, headers=tuple(headers))


class FakeHuggingFace(FakeService):
    """The part of the Hub that `huggingface_hub` uses to list and download a model repo's files:

    - `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=&expand=`: list_repo_files / list_repo_tree,
      JSON entries, `page_size` per page, the next page in a `Link: <...>; rel="next"` header;
    - `GET /api/models/{repo}[/revision/{rev}]`: model_info, with `siblings` (sizes too if `?blobs=true`);
    - `HEAD`/`GET /{repo}/resolve/{rev}/{file}`: the file. Non-LFS files answer 200 with ETag (git blob id),
      X-Repo-Commit and the bytes; LFS files (`HF_LFS_SUFFIXES`) a 302 to the CDN carrying X-Repo-Commit,
      X-Linked-Etag (sha256) and X-Linked-Size, which is where hf_hub_download reads the metadata from;
    - `GET /{repo}/blob/{rev}/{file}`: the HTML page a browser gets (a trap for clients that don't rewrite
      blob URLs to resolve URLs).

    Files, on the Hub and on its CDN, take Range requests (`huggingface_hub` resumes a dropped download
    with one). `tamper` makes a file's bytes differ from the checksums the listing and headers report.

    Refusals follow the Hub: without a token, a missing or private repo answers 401 RepoNotFound;
    with a token, a missing repo answers 404 RepoNotFound and a private repo whose token is not the
    one it wants answers 401 "Invalid credentials in Authorization header" (no error code).
    """

    _API = re.compile(
        r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>tree|revision)/(?P<rev>[^/]+)(?P<sub>/.*)?)?$"
    )
    _FILE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/(?P<kind>resolve|blob)/(?P<rev>[^/]+)/(?P<file>.+)$")

    def __init__(self, cdn: HttpFiles | None = None, page_size: int = 1000) -> None:
        super().__init__(cdn)
        self.page_size = page_size
        self.repos: dict[str, HfRepo] = {}
        self.tampered: dict[tuple[str, str], bytes] = {}  # (repo, file) → bytes served instead
        self.api.handle("/", self._answer)

    def add_repo(
        self, repo_id: str, files: Mapping[str, bytes], revision: str = "main", token: str | None = None
    ) -> str:
        """Add `files` (path in repo → bytes) to `repo_id` at `revision`; return the commit hash it
        resolves to. A 40-hex `revision` is taken as a commit, any other as a branch, which points at
        a new commit. `token` makes the repo private (later calls without one leave it so)."""
        repo = self.repos.setdefault(repo_id, HfRepo())
        if token is not None:
            repo.token = token
        if re.fullmatch(r"[0-9a-f]{40}", revision):
            commit = revision
        else:
            commit = hashlib.sha1(repr((repo_id, revision, sorted(files.items()))).encode()).hexdigest()
            repo.branches[revision] = commit
        repo.commits[commit] = dict(files)
        for path, data in files.items():
            if _is_lfs(path):
                self._cdn_file(self.lfs_path(data), data, ranges=True)
        return commit

    def lfs_path(self, data: bytes) -> str:
        """The CDN path an LFS file with these bytes is served from (for `cdn.hits`, `cdn.cut_once`)."""
        return f"/hf-lfs/{_sha256(data)}"

    def hold(self, data: bytes) -> threading.Event:
        """From now on the CDN sends the LFS file with these bytes only once the returned event is set
        (headers at once): a download held open part-way."""
        gate = self.gates[self.lfs_path(data)] = threading.Event()
        return gate

    def tamper(self, repo_id: str, filename: str, data: bytes) -> None:
        """Serve `data` as `filename` of `repo_id` (every revision) while the listing, model_info and
        the resolve headers keep describing the bytes that were added: a corrupted download."""
        self.tampered[(repo_id, filename)] = data

    def resolve_path(self, repo_id: str, filename: str, revision: str = "main") -> str:
        """The path `hf_hub_url` builds for a file (revision quoted whole, filename with its slashes)."""
        return f"/{repo_id}/resolve/{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(filename)}"

    def tree_path(self, repo_id: str, revision: str = "main") -> str:
        """The path `list_repo_files` asks for."""
        return f"/api/models/{repo_id}/tree/{urllib.parse.quote(revision, safe='')}"

    def _answer(self, request: Request) -> Route | None:
        if match := self._API.match(request.path):
            return self._api_answer(request, match)
        if match := self._FILE.match(request.path):
            return self._file_answer(request, match)
        return None

    def _refusal(self, repo_id: str, request: Request) -> Route | None:
        repo = self.repos.get(repo_id)
        if repo is not None and _bearer_is(request, repo.token):
            return None
        if request.authorization is None:
            return hub_error(401, "RepoNotFound", "Invalid username or password.")
        if repo is None:
            return hub_error(404, "RepoNotFound", "Repository not found")
        return hub_error(401, None, "Invalid credentials in Authorization header")

    def _commit(self, repo_id: str, raw_revision: str | None) -> str | Route:
        """The commit a %-encoded revision names, or the error the Hub answers."""
        revision = urllib.parse.unquote(raw_revision or "main")
        commit = self.repos[repo_id].commit_of(revision)
        return commit or hub_error(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def _repo_commit(self, request: Request, match: re.Match[str]) -> tuple[str, str] | Route:
        """The repo and commit a Hub URL names, or the error the Hub answers (refused, unknown revision)."""
        repo_id = match["repo"]
        if refusal := self._refusal(repo_id, request):
            return refusal
        commit = self._commit(repo_id, match["rev"])
        return commit if isinstance(commit, Route) else (repo_id, commit)

    def _api_answer(self, request: Request, match: re.Match[str]) -> Route:
        found = self._repo_commit(request, match)
        if isinstance(found, Route):
            return found
        repo_id, commit = found
        if match["kind"] == "tree":
            return self._tree(request, repo_id, commit, urllib.parse.unquote(match["sub"] or "").strip("/"))
        return json_route(self._model_info(request, repo_id, commit))

    def _tree(self, request: Request, repo_id: str, commit: str, sub: str) -> Route:
        files = self.repos[repo_id].commits[commit]
        entries = _tree_entries(files, sub, recursive=request.param("recursive") in ("true", "True", "1"))
        if sub and not entries:
            return hub_error(404, "EntryNotFound", f"{sub} does not exist on {commit}", commit)
        start = int(request.param("cursor") or 0)
        headers: tuple[tuple[str, str], ...] = ()
        if start + self.page_size < len(entries):
            query = {**request.query, "cursor": [str(start + self.page_size)]}
            next_url = f"{self.base}{request.path}?{urllib.parse.urlencode(query, doseq=True)}"
            headers = (("Link", f'<{next_url}>; rel="next"'),)
        return json_route(entries[start : start + self.page_size], headers=headers)

    def _model_info(self, request: Request, repo_id: str, commit: str) -> dict[str, Any]:
        repo, files = self.repos[repo_id], self.repos[repo_id].commits[commit]
        blobs = request.param("blobs") in ("true", "True", "1")
        return {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit,
            "private": repo.token is not None,
            "gated": False,
            "disabled": False,
            "lastModified": "2024-05-01T00:00:00.000Z",
            "tags": ["lora"],
            "siblings": [_sibling(path, data, blobs) for path, data in sorted(files.items())],
        }

    def _file_answer(self, request: Request, match: re.Match[str]) -> Route:
        found = self._repo_commit(request, match)
        if isinstance(found, Route):
            return found
        repo_id, commit = found
        filename = urllib.parse.unquote(match["file"])
        data = self.repos[repo_id].commits[commit].get(filename)
        if data is None:
            return hub_error(404, "EntryNotFound", f"{filename} does not exist on {commit}", commit)
        if match["kind"] == "blob":
            page = f"<!doctype html><html><body>{filename} in {repo_id}</body></html>".encode()
            return Route(chunks=(page,), headers=(("Content-Type", "text/html; charset=utf-8"),))
        served = self.tampered.get((repo_id, filename), data)
        if _is_lfs(filename):
            sha = _sha256(data)
            return Route(
                status=302,
                location=self._cdn_file(self.lfs_path(data), served, ranges=True),
                headers=(
                    ("X-Repo-Commit", commit),
                    ("X-Linked-Etag", f'"{sha}"'),
                    ("X-Linked-Size", str(len(data))),
                ),
            )
        headers = (("X-Repo-Commit", commit), ("ETag", f'"{_git_blob_sha1(data)}"'))
        return Route(
            chunks=(served,),
            headers=(("Content-Type", "application/octet-stream"), *headers),
            ranges=True,  # answers with Accept-Ranges: bytes
        )


def _is_lfs(path: str) -> bool:
    return PurePosixPath(path).suffix in HF_LFS_SUFFIXES


def _tree_entries(files: Mapping[str, bytes], sub: str, recursive: bool) -> list[dict[str, Any]]:
    """The Hub's tree listing under `sub`: folders first, then files; all depths if `recursive`."""
    prefix = f"{sub}/" if sub else ""
    folders: set[str] = set()
    paths: list[str] = []
    for path in sorted(files):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        if recursive:
            folders.update(prefix + "/".join(parts[:depth]) for depth in range(1, len(parts)))
            paths.append(path)
        elif len(parts) > 1:
            folders.add(prefix + parts[0])
        else:
            paths.append(path)
    listed = [
        {"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
        for f in sorted(folders)
    ]
    return listed + [_file_entry(path, files[path]) for path in paths]


def _file_entry(path: str, data: bytes) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "oid": _git_blob_sha1(data), "size": len(data), "path": path}
    if _is_lfs(path):
        entry["lfs"] = {"oid": _sha256(data), "size": len(data), "pointerSize": 134}
    return entry


def _sibling(path: str, data: bytes, blobs: bool) -> dict[str, Any]:
    if not blobs:
        return {"rfilename": path}
    lfs = {"sha256": _sha256(data), "size": len(data), "pointerSize": 134} if _is_lfs(path) else None
    return {"rfilename": path, "size": len(data), "blobId": _git_blob_sha1(data), "lfs": lfs}


@dataclass
class CivitaiModel:
    """A CivitAI model: versions newest first (as the API lists them), each (id, {filename: bytes})."""

    model_id: int
    name: str
    versions: list[tuple[int, dict[str, bytes]]]
    token: str | None
    model_type: str
    base_model: str


class FakeCivitai(FakeService):
    """CivitAI's public REST API and its download redirect:

    - `GET /api/v1/models/{id}`: the model, `modelVersions` newest first, each with `files` (name, type,
      primary, sizeKB, metadata.format SafeTensor/PickleTensor, hashes, downloadUrl) — public, as on CivitAI;
    - `GET /api/v1/model-versions/{versionId}`: one version, with `modelId` and `model`;
    - `GET /api/download/models/{versionId}[?type=Model&format=...]`: a 307 to the file on the CDN (the
      primary file unless `format` picks another). A model with a token answers 401 unless the request
      carries `Authorization: Bearer <token>` or `?token=<token>` (CivitAI takes either).
    """

    _MODEL = re.compile(r"^/api/v1/models/(?P<id>\d+)$")
    _VERSION = re.compile(r"^/api/v1/model-versions/(?P<id>\d+)$")
    _DOWNLOAD = re.compile(r"^/api/download/models/(?P<id>\d+)$")

    def __init__(self, cdn: HttpFiles | None = None) -> None:
        super().__init__(cdn)
        self.models: dict[int, CivitaiModel] = {}
        self.file_urls: dict[tuple[int, str], str] = {}  # (version id, file name) → CDN URL
        self.api.handle("/api/", self._answer)

    def add_model(
        self,
        model_id: int,
        versions: Sequence[tuple[int, Mapping[str, bytes]]],
        token: str | None = None,
        name: str | None = None,
        model_type: str = "LORA",
        base_model: str = "Flux.1 D",
    ) -> dict[str, Any]:
        """Add a model whose `versions` are given newest first; return its JSON as the API serves it."""
        model = CivitaiModel(
            model_id,
            name or f"Model {model_id}",
            [(version_id, dict(files)) for version_id, files in versions],
            token,
            model_type,
            base_model,
        )
        self.models[model_id] = model
        for version_id, files in model.versions:
            for filename, data in files.items():
                disposition = ("Content-Disposition", f'attachment; filename="{filename}"')
                url = self._cdn_file(f"/civitai-files/{version_id}/{filename}", data, (disposition,))
                self.file_urls[(version_id, filename)] = url
        return self.model_json(model_id)

    def download_path(self, version_id: int) -> str:
        return f"/api/download/models/{version_id}"

    def model_json(self, model_id: int) -> dict[str, Any]:
        model = self.models[model_id]
        return {
            "id": model.model_id,
            "name": model.name,
            "description": "",
            "type": model.model_type,
            "nsfw": False,
            "tags": ["flux"],
            "creator": {"username": "someone"},
            "modelVersions": [self._version_json(model, index) for index in range(len(model.versions))],
        }

    def _version_json(self, model: CivitaiModel, index: int) -> dict[str, Any]:
        version_id, files = model.versions[index]
        created = datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC) - datetime.timedelta(days=index)
        stamp = created.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        primary = _primary(files)
        return {
            "id": version_id,
            "modelId": model.model_id,
            "name": f"v{len(model.versions) - index}",
            "createdAt": stamp,
            "updatedAt": stamp,
            "baseModel": model.base_model,
            "trainedWords": [],
            "downloadUrl": f"{self.base}{self.download_path(version_id)}",
            "files": [
                self._file_json(version_id, number, filename, data, filename == primary)
                for number, (filename, data) in enumerate(files.items())
            ],
        }

    def _file_json(
        self, version_id: int, number: int, filename: str, data: bytes, primary: bool
    ) -> dict[str, Any]:
        file_format = _civitai_format(filename)
        url = f"{self.base}{self.download_path(version_id)}"
        return {
            "id": version_id * 100 + number,
            "name": filename,
            "type": "Model",
            "primary": primary,
            "sizeKB": len(data) / 1024,
            "metadata": {"format": file_format, "size": None, "fp": None},
            "hashes": {"SHA256": _sha256(data).upper()},
            "downloadUrl": url if primary else f"{url}?type=Model&format={file_format}",
        }

    def _answer(self, request: Request) -> Route | None:
        if match := self._MODEL.match(request.path):
            model_id = int(match["id"])
            if model_id not in self.models:
                return json_route({"error": f"No model with id {model_id}"}, status=404)
            return json_route(self.model_json(model_id))
        if match := self._VERSION.match(request.path):
            found = self._find_version(int(match["id"]))
            if found is None:
                return json_route({"error": f"Version not found: {match['id']}"}, status=404)
            model, index = found
            details = {"name": model.name, "type": model.model_type, "nsfw": False}
            return json_route({**self._version_json(model, index), "model": details})
        if match := self._DOWNLOAD.match(request.path):
            return self._download(request, int(match["id"]))
        return None

    def _find_version(self, version_id: int) -> tuple[CivitaiModel, int] | None:
        for model in self.models.values():
            for index, (candidate, _) in enumerate(model.versions):
                if candidate == version_id:
                    return model, index
        return None

    def _download(self, request: Request, version_id: int) -> Route:
        found = self._find_version(version_id)
        if found is None:
            return json_route({"error": "Model not found"}, status=404)
        model, index = found
        token = model.token
        if not (_bearer_is(request, token) or request.param("token") == token):
            message = "The creator of this asset requires you to be logged in to download it"
            return json_route({"error": "Unauthorized", "message": message}, status=401)
        files = model.versions[index][1]
        wanted = request.param("format")
        chosen = next((n for n in files if wanted and _civitai_format(n) == wanted), _primary(files))
        return Route(status=307, location=self.file_urls[(version_id, chosen)])


def _civitai_format(filename: str) -> str:
    return CIVITAI_FORMATS.get(PurePosixPath(filename).suffix, "Other")


def _primary(files: Mapping[str, bytes]) -> str:
    """CivitAI marks one file primary: here the first .safetensors, else the first file."""
    return next((name for name in files if name.endswith(".safetensors")), next(iter(files)))


class FakeServices:
    """All three fakes sharing one CDN: `with FakeServices() as fakes: env = fakes.env()`."""

    def __init__(self) -> None:
        self.cdn = HttpFiles()
        self.replicate = FakeReplicate(self.cdn)
        self.hf = FakeHuggingFace(self.cdn)
        self.civitai = FakeCivitai(self.cdn)
        self._stack = contextlib.ExitStack()

    def env(self) -> dict[str, str]:
        """The predictor's settings that point it at these fakes."""
        return {
            "FLUX_DAY_REPLICATE_URL": self.replicate.base,
            "HF_ENDPOINT": self.hf.base,
            "FLUX_DAY_CIVITAI_URL": self.civitai.base,
        }

    def failures(self) -> list[str]:
        """Tracebacks of fake handlers that raised: a test that sees a 500 should look here."""
        servers = (self.cdn, self.replicate.api, self.hf.api, self.civitai.api)
        return [failure for server in servers for failure in server.failures]

    def __enter__(self) -> Self:
        with contextlib.ExitStack() as stack:
            for server in (self.cdn, self.replicate, self.hf, self.civitai):
                stack.enter_context(server)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
