"""The fake Replicate, Hugging Face and CivitAI answer like the real services, as far as a client sees.

Tests of the LoRA fetcher trust these fakes, so a fake that drifted from the real service would let
a broken fetcher pass. The Hugging Face fake is driven here by `huggingface_hub` itself (the client
the fetcher may use) and the others by `requests` (what the fetcher downloads with), including the
redirects to a CDN on another origin and who receives which Authorization header.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
import requests
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.harness.fake_services import REPLICATE_MEMBER, FakeServices, make_tar
from tests.harness.http_files import HttpFiles

LORA = b"pretend safetensors bytes"


@pytest.fixture
def fakes() -> Iterator[FakeServices]:
    with FakeServices() as services:
        yield services
        assert services.failures() == []


def tar_members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {member.name: member for member in tar.getmembers()}


def tar_read(data: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        extracted = tar.extractfile(name)
        assert extracted is not None
        return extracted.read()


def cdn_path(url: str, cdn: HttpFiles) -> str:
    """The CDN path of a URL the fakes handed out (they carry a signature-like query string)."""
    assert url.startswith(cdn.base + "/")
    return url[len(cdn.base) :].split("?")[0]


def test_http_files_keeps_each_requests_headers_and_answers_head_without_a_body() -> None:
    """Tests tell who got which token from `headers`; huggingface_hub asks for metadata with HEAD."""
    with HttpFiles() as files:
        url = files.serve("/a.bin", b"abc")
        requests.get(url, headers={"Authorization": "Bearer one"}, timeout=5)
        head = requests.head(url + "?q=1", timeout=5)
        assert head.status_code == 200 and head.content == b"" and head.headers["Content-Length"] == "3"
        assert files.authorization("/a.bin") == ["Bearer one", None]
        assert files.hits["/a.bin"] == 2
        assert [(r.method, r.query) for r in files.requests] == [("GET", {}), ("HEAD", {"q": ["1"]})]


def test_make_tar_writes_hostile_names_and_links_exactly_as_given() -> None:
    """Refusal tests need archives no well-behaved tool would write: tarfile must not tidy them up."""
    data = make_tar(
        {
            "a.safetensors": b"A",
            "b.safetensors": b"B",
            "../escape.safetensors": b"E",
            "/abs/x.safetensors": b"X",
        },
        links={"lora.safetensors": "../../etc/passwd"},
        hardlinks={"out/lora.safetensors": "/etc/passwd"},
    )
    members = tar_members(data)
    assert list(members) == [
        "a.safetensors",
        "b.safetensors",
        "../escape.safetensors",
        "/abs/x.safetensors",
        "lora.safetensors",
        "out/lora.safetensors",
    ]
    assert members["lora.safetensors"].issym() and members["lora.safetensors"].linkname == "../../etc/passwd"
    assert (
        members["out/lora.safetensors"].islnk() and members["out/lora.safetensors"].linkname == "/etc/passwd"
    )
    assert tar_read(data, "b.safetensors") == b"B"
    assert make_tar({"a": b"1"}) == make_tar({"a": b"1"})  # reproducible: same bytes, same CDN path


def test_replicate_redirects_a_model_or_its_version_to_the_trainers_tar_on_the_cdn(
    fakes: FakeServices,
) -> None:
    """Replicate answers `_weights` with a redirect to replicate.delivery; the tar holds the LoRA where
    the trainer puts it."""
    replicate = fakes.replicate
    url = replicate.add_model("alice", "flux-fox", LORA, version="abc123")
    for path in (
        replicate.weights_path("alice", "flux-fox"),
        replicate.weights_path("alice", "flux-fox", "abc123"),
    ):
        answer = requests.get(replicate.base + path, allow_redirects=False, timeout=5)
        assert answer.status_code == 307 and answer.headers["Location"] == url
    tar = requests.get(replicate.base + replicate.weights_path("alice", "flux-fox"), timeout=5)
    assert tar.url == url and tar_read(tar.content, REPLICATE_MEMBER) == LORA
    assert fakes.cdn.hits[cdn_path(url, fakes.cdn)] == 1
    missing = replicate.weights_path("alice", "flux-fox", "nope")
    assert requests.get(replicate.base + missing, timeout=5).status_code == 404


def test_replicate_private_model_needs_its_token_which_the_cdn_never_sees(fakes: FakeServices) -> None:
    replicate = fakes.replicate
    url = replicate.add_model("alice", "secret", LORA, as_tar=False, token="r8_tok")
    assert cdn_path(url, fakes.cdn).endswith("/lora.safetensors")
    weights = replicate.base + replicate.weights_path("alice", "secret")
    assert requests.get(weights, timeout=5).status_code == 401
    answer = requests.get(weights, headers={"Authorization": "Bearer r8_tok"}, timeout=5)
    assert answer.content == LORA
    assert replicate.api.authorization(replicate.weights_path("alice", "secret")) == [None, "Bearer r8_tok"]
    assert fakes.cdn.authorization(cdn_path(url, fakes.cdn)) == [None]  # requests drops it across origins


def test_hf_list_repo_files_follows_pages_for_a_branch_or_a_commit(fakes: FakeServices) -> None:
    """huggingface_hub lists through /api/models/{repo}/tree/{rev}?recursive=true, page after page."""
    hf = fakes.hf
    files = {"README.md": b"# fox", "lora.safetensors": LORA, "more/deep/b.safetensors": b"B"}
    main = hf.add_repo("alice/fox", files)
    hf.add_repo("alice/fox", {"v2.safetensors": b"2"}, revision="dev")
    hf.page_size = 2
    api = huggingface_hub.HfApi(endpoint=hf.base, token=False)
    assert sorted(api.list_repo_files("alice/fox")) == sorted(files)
    assert api.list_repo_files("alice/fox", revision="dev") == ["v2.safetensors"]
    assert sorted(api.list_repo_files("alice/fox", revision=main)) == sorted(files)
    assert hf.api.hits[hf.tree_path("alice/fox")] == 3  # 2 folders + 3 files, 2 per page
    first = next(r for r in hf.api.requests if r.path == hf.tree_path("alice/fox"))
    assert first.query == {"recursive": ["true"], "expand": ["false"]}


def test_hf_hub_download_gets_lfs_files_from_the_cdn_and_small_files_from_the_hub(
    fakes: FakeServices, tmp_path: Path
) -> None:
    """hf_hub_download HEADs /resolve for X-Repo-Commit and the ETag, then GETs the file: an LFS file
    from the CDN the redirect names (without the token), a small file from the Hub itself."""
    hf = fakes.hf
    commit = hf.add_repo("alice/fox", {"lora.safetensors": LORA, "README.md": b"# fox"}, token="hf_tok")

    def download(name: str) -> bytes:
        path = huggingface_hub.hf_hub_download(
            "alice/fox", name, endpoint=hf.base, token="hf_tok", cache_dir=tmp_path
        )
        assert f"/snapshots/{commit}/" in path
        return Path(path).read_bytes()

    assert download("lora.safetensors") == LORA
    assert download("README.md") == b"# fox"
    resolve = hf.resolve_path("alice/fox", "lora.safetensors")
    assert [r.method for r in hf.api.requests if r.path == resolve] == ["HEAD"]
    assert hf.api.authorization(resolve) == ["Bearer hf_tok"]
    assert [r.authorization for r in fakes.cdn.requests] == [None]
    assert hf.api.hits[hf.resolve_path("alice/fox", "README.md")] == 2  # HEAD, then GET


def test_hf_hub_url_is_the_fakes_resolve_path_which_plain_requests_can_download(fakes: FakeServices) -> None:
    hf = fakes.hf
    hf.add_repo("alice/fox", {"sub/dir/lora.safetensors": LORA}, revision="refs/pr/1")
    url = huggingface_hub.hf_hub_url(
        "alice/fox", "sub/dir/lora.safetensors", revision="refs/pr/1", endpoint=hf.base
    )
    assert url == hf.base + hf.resolve_path("alice/fox", "sub/dir/lora.safetensors", "refs/pr/1")
    assert url.endswith("/alice/fox/resolve/refs%2Fpr%2F1/sub/dir/lora.safetensors")
    answer = requests.get(url, timeout=5)
    assert answer.content == LORA and answer.history[0].status_code == 302
    blob = url.replace("/resolve/", "/blob/")
    assert requests.get(blob, timeout=5).headers["Content-Type"].startswith("text/html")


def test_hf_refusals_raise_the_errors_huggingface_hub_raises_against_the_hub(
    fakes: FakeServices, tmp_path: Path
) -> None:
    """The Hub's X-Error-Code, not its status, picks the exception: 401 RepoNotFound for anonymous
    requests to private or missing repos, a bare 401 for a token it doesn't know."""
    hf = fakes.hf
    hf.add_repo("alice/private", {"lora.safetensors": LORA}, token="hf_tok")
    hf.add_repo("alice/public", {"lora.safetensors": LORA})

    def listing(repo: str, token: str | bool, revision: str = "main") -> list[str]:
        return huggingface_hub.HfApi(endpoint=hf.base, token=token).list_repo_files(repo, revision=revision)

    with pytest.raises(RepositoryNotFoundError) as anonymous:
        listing("alice/private", False)
    assert anonymous.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as wrong:
        listing("alice/private", "hf_wrong")
    assert wrong.value.response.status_code == 401 and not isinstance(wrong.value, RepositoryNotFoundError)
    with pytest.raises(RepositoryNotFoundError) as missing:
        listing("alice/missing", "hf_tok")
    assert missing.value.response.status_code == 404
    with pytest.raises(RevisionNotFoundError):
        listing("alice/public", False, revision="nope")
    with pytest.raises(RemoteEntryNotFoundError):
        huggingface_hub.hf_hub_download(
            "alice/public", "other.safetensors", endpoint=hf.base, token=False, cache_dir=tmp_path
        )


def test_civitai_lists_versions_newest_first_with_their_files_and_formats(fakes: FakeServices) -> None:
    civitai = fakes.civitai
    civitai.add_model(
        123, [(456, {"new.safetensors": b"NEW", "new.pt": b"PICKLE"}), (455, {"old.safetensors": b"OLD"})]
    )
    model = requests.get(f"{civitai.base}/api/v1/models/123", timeout=5).json()
    assert model["id"] == 123 and model["type"] == "LORA"
    newest, oldest = model["modelVersions"]
    assert (newest["id"], oldest["id"]) == (456, 455) and newest["createdAt"] > oldest["createdAt"]
    primary, pickle = newest["files"]
    assert (primary["primary"], primary["metadata"]["format"]) == (True, "SafeTensor")
    assert (pickle["primary"], pickle["metadata"]["format"]) == (False, "PickleTensor")
    assert primary["downloadUrl"] == f"{civitai.base}/api/download/models/456"
    assert pickle["downloadUrl"] == f"{civitai.base}/api/download/models/456?type=Model&format=PickleTensor"
    version = requests.get(f"{civitai.base}/api/v1/model-versions/455", timeout=5).json()
    assert version["modelId"] == 123 and version["files"][0]["name"] == "old.safetensors"
    assert requests.get(f"{civitai.base}/api/v1/models/9", timeout=5).status_code == 404


def test_civitai_download_redirects_to_the_cdn_and_needs_the_models_token(fakes: FakeServices) -> None:
    """A token-gated model answers 401 without it; with it (header or ?token=), a 307 to the file."""
    civitai = fakes.civitai
    model = civitai.add_model(7, [(70, {"fox.safetensors": LORA, "fox.pt": b"PICKLE"})], token="civ_tok")
    primary, pickle = model["modelVersions"][0]["files"]
    assert requests.get(primary["downloadUrl"], timeout=5).status_code == 401
    redirect = requests.get(
        primary["downloadUrl"], headers={"Authorization": "Bearer civ_tok"}, allow_redirects=False, timeout=5
    )
    assert redirect.status_code == 307 and redirect.headers["Location"].startswith(fakes.cdn.base)
    answer = requests.get(primary["downloadUrl"], params={"token": "civ_tok"}, timeout=5)
    assert answer.content == LORA and 'filename="fox.safetensors"' in answer.headers["Content-Disposition"]
    assert requests.get(pickle["downloadUrl"], params={"token": "civ_tok"}, timeout=5).content == b"PICKLE"
    assert civitai.api.authorization(civitai.download_path(70)) == [None, "Bearer civ_tok", None, None]


def test_fake_services_env_points_each_setting_at_its_own_fake(fakes: FakeServices) -> None:
    env = fakes.env()
    assert env == {
        "FLUX_DAY_REPLICATE_URL": fakes.replicate.base,
        "HF_ENDPOINT": fakes.hf.base,
        "FLUX_DAY_CIVITAI_URL": fakes.civitai.base,
    }
    assert len({*env.values(), fakes.cdn.base}) == 4  # four origins: a token sent to one is seen by one
