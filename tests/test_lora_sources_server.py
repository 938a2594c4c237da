"""Every LoRA source end to end, through the real Cog server against fake Replicate, Hugging Face and
CivitAI (`tests.harness.fake_services`): what a user gets for each kind of reference, who sees which token,
what the disk cache saves, what a hostile archive can do, and what a restarted server remembers.

The proof that a reference fetched the right file is the image itself: it must be exactly the image
the same LoRA file gives when sent inline as a data: URI. Each source serves a LoRA of its own, so
neither the in-memory LRU nor the disk cache can stand in for a download a test means to see.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.cog_server import ROOT, CogServer, server_env
from tests.harness.fake_services import REPLICATE_MEMBER, FakeServices, make_tar
from tests.harness.http_files import HttpFiles
from tests.harness.lora_files import FAST, data_uri, kohya, random_lora, to_bytes

MAX_LORA_BYTES = 2_000_000
TOKENS = {
    "REPLICATE_API_TOKEN": "r8_SECRETTOKEN",
    "HF_TOKEN": "hf_SECRETTOKEN",
    "CIVITAI_API_TOKEN": "civ_SECRETTOKEN",
}
LEAKS = ("SECRETTOKEN", "hunter2", "X-Amz-Signature", "X-Amz-Expires", "Traceback", "site-packages")
VERSION = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"


def lora(seed: int) -> bytes:
    return to_bytes(kohya(random_lora(seed)))


# One LoRA per source: a reference that fetched the wrong file gives another image.
REP_TAR, REP_PINNED, REP_PREFIXED, REP_BARE = lora(101), lora(102), lora(103), lora(104)
HF_SINGLE, HF_DIFFUSERS, HF_NAMED, HF_A, HF_B, HF_V2, HF_NESTED, HF_PRIVATE, HF_CACHED = (
    lora(seed) for seed in range(201, 210)
)
CIV_NEW, CIV_OLD, CIV_MIXED = lora(301), lora(302), lora(303)
PLAIN_TAR, DATA_TAR, CACHED, ABSOLUTE, BESIDE_ESCAPE = lora(401), lora(402), lora(403), lora(404), lora(405)
GOOD, DECOY = lora(501), lora(999)  # GOOD: the working LoRA beside every failure; DECOY: never chosen
RESTART_PLAIN, RESTART_PINNED = lora(601), lora(602)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's own corner: `cache/` (FLUX_DAY_LORA_CACHE) and `tmp/` (TMPDIR), nothing else."""
    base = tmp_path_factory.mktemp("lora-sources")
    (base / "tmp").mkdir()
    return base


@pytest.fixture(scope="module")
def fakes() -> Iterator[FakeServices]:
    with FakeServices() as services:
        yield services
        assert services.failures() == []


@pytest.fixture(scope="module")
def web() -> Iterator[HttpFiles]:
    """Any other host on the internet, serving plain URLs."""
    with HttpFiles() as files:
        yield files


def sources_env(tiny_weights: Path, fakes: FakeServices, cache: Path, tmp: Path) -> dict[str, str]:
    """A server that reaches the fake services, with its own LoRA cache and tokens for each service."""
    return server_env(
        tiny_weights,
        tmp,
        FLUX_DAY_ALLOW_PRIVATE_URLS="1",
        FLUX_DAY_MAX_LORA_BYTES=str(MAX_LORA_BYTES),
        FLUX_DAY_LORA_CACHE=str(cache),
        **fakes.env(),
        **TOKENS,
    )


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora-sources-logs") / "cog.log"


@pytest.fixture(scope="module")
def server(tiny_weights: Path, fakes: FakeServices, root: Path, log_path: Path) -> Iterator[CogServer]:
    env = sources_env(tiny_weights, fakes, root / "cache", root / "tmp")
    with CogServer.ready(env, log_path) as cog:
        yield cog


def image(server: CogServer, **inputs: object) -> bytes:
    (raw,) = server.images(**FAST, **inputs)
    return raw


_inline: dict[bytes, bytes] = {}


def inline(server: CogServer, data: bytes) -> bytes:
    """The image `data` gives as replicate_weights sent inline: what every source must reproduce."""
    if data not in _inline:
        _inline[data] = image(server, replicate_weights=data_uri(data))
    return _inline[data]


def cdn_path(url: str, cdn: HttpFiles) -> str:
    assert url.startswith(cdn.base + "/"), url
    return url[len(cdn.base) :].split("?")[0]


def assert_tokens_stayed_home(fakes: FakeServices, web: HttpFiles) -> None:
    """Each service's API saw its own token and no other; the CDN and other hosts saw none."""
    for api, token in (
        (fakes.replicate.api, TOKENS["REPLICATE_API_TOKEN"]),
        (fakes.hf.api, TOKENS["HF_TOKEN"]),
        (fakes.civitai.api, TOKENS["CIVITAI_API_TOKEN"]),
    ):
        # Requests without a token leak nothing (huggingface_hub asks the Hub for its own things too).
        sent = {request.authorization for request in api.requests} - {None}
        assert sent <= {f"Bearer {token}"}, (api.base, sent)
    for files in (fakes.cdn, web):
        leaked = [(r.path, r.authorization) for r in files.requests if r.authorization is not None]
        assert leaked == [], leaked
        leaked = [
            r.path for r in files.requests if any("SECRETTOKEN" in q for q in map(str, r.query.values()))
        ]
        assert leaked == [], leaked


# --- Replicate -------------------------------------------------------------------------------------


def test_replicate_references_give_the_image_of_the_same_file_sent_inline(
    server: CogServer, fakes: FakeServices, web: HttpFiles
) -> None:
    replicate, cdn = fakes.replicate, fakes.cdn
    tar_url = replicate.add_model("alice", "tarred", REP_TAR, token=TOKENS["REPLICATE_API_TOKEN"])
    pinned_url = replicate.add_model("alice", "pinned", REP_PINNED, version=VERSION)
    prefixed_url = replicate.add_model("alice", "prefixed", REP_PREFIXED)
    bare_url = replicate.add_model("alice", "bare", REP_BARE, as_tar=False)
    assert bare_url.split("?")[0].endswith("/lora.safetensors")

    cases = [
        ("alice/tarred", REP_TAR),  # private: only works with the server's REPLICATE_API_TOKEN
        (f"alice/pinned/{VERSION}", REP_PINNED),
        ("replicate.com/alice/prefixed", REP_PREFIXED),
        ("alice/bare", REP_BARE),
    ]
    for reference, data in cases:
        assert image(server, replicate_weights=reference) == inline(server, data), reference
    assert len({inline(server, data) for _, data in cases}) == len(cases)

    # Each file was downloaded once, from the CDN, without the token; the API saw it.
    for url in (tar_url, pinned_url, prefixed_url, bare_url):
        assert cdn.authorization(cdn_path(url, cdn)) == [None], url
    bearer = f"Bearer {TOKENS['REPLICATE_API_TOKEN']}"
    assert replicate.api.authorization(replicate.weights_path("alice", "tarred")) == [bearer]
    assert replicate.api.authorization(replicate.weights_path("alice", "pinned", VERSION)) == [bearer]
    # A pinned version is its own cache key: no question about the unversioned model was asked.
    assert replicate.api.hits[replicate.weights_path("alice", "pinned")] == 0
    assert_tokens_stayed_home(fakes, web)


def test_other_spellings_of_a_replicate_model_reuse_the_cached_file(
    server: CogServer, fakes: FakeServices
) -> None:
    replicate, cdn = fakes.replicate, fakes.cdn
    url = replicate.add_model("alice", "spelled", CACHED, version="abc123")
    expected = inline(server, CACHED)
    for reference in (
        "alice/spelled",
        "https://replicate.com/alice/spelled",
        "replicate.com/alice/spelled/",
    ):
        assert image(server, replicate_weights=reference) == expected, reference
    # Unversioned: one model however spelt, so the parsed LoRA serves the other spellings until its
    # recheck is due (as a repeat of one spelling is served): asked once, downloaded once.
    assert replicate.api.hits[replicate.weights_path("alice", "spelled")] == 1
    assert cdn.hits[cdn_path(url, cdn)] == 1
    # Pinned: its own key (one more download), then the cache for the other spelling of the version.
    assert image(server, replicate_weights="alice/spelled/abc123") == expected
    assert image(server, replicate_weights="alice/spelled/versions/abc123") == expected
    assert cdn.hits[cdn_path(url, cdn)] == 2
    assert replicate.api.hits[replicate.weights_path("alice", "spelled", "abc123")] == 1


# --- Hugging Face ----------------------------------------------------------------------------------


def test_hugging_face_references_give_the_image_of_the_same_file_sent_inline(
    server: CogServer, fakes: FakeServices, web: HttpFiles
) -> None:
    hf = fakes.hf
    hf.add_repo("hfuser/single", {"README.md": b"# style\n", "flux-style.safetensors": HF_SINGLE})
    hf.add_repo(
        "hfuser/diffusers",
        {"pytorch_lora_weights.safetensors": HF_DIFFUSERS, "image_encoder.safetensors": DECOY},
    )
    hf.add_repo("hfuser/named", {"my_style_LoRA.safetensors": HF_NAMED, "text_encoder.safetensors": DECOY})
    main = hf.add_repo("hfuser/pair", {"a.safetensors": HF_A, "b.safetensors": HF_B, "config.json": b"{}"})
    hf.add_repo("hfuser/pair", {"a.safetensors": HF_V2, "b.safetensors": DECOY}, revision="v2")
    hf.add_repo("hfuser/nested", {"loras/style one.safetensors": HF_NESTED, "x.safetensors": DECOY})
    hf.add_repo("hfuser/private", {"lora.safetensors": HF_PRIVATE}, token=TOKENS["HF_TOKEN"])

    cases = [
        ("huggingface.co/hfuser/single", HF_SINGLE),
        ("https://huggingface.co/hfuser/diffusers", HF_DIFFUSERS),
        ("huggingface.co/hfuser/named", HF_NAMED),
        ("https://huggingface.co/hfuser/pair/blob/main/b.safetensors", HF_B),
        (f"https://huggingface.co/hfuser/pair/resolve/{main}/a.safetensors", HF_A),
        ("huggingface.co/hfuser/pair/resolve/v2/a.safetensors", HF_V2),
        ("huggingface.co/hfuser/nested/blob/main/loras/style one.safetensors", HF_NESTED),
        ("huggingface.co/hfuser/private", HF_PRIVATE),  # only works with the server's HF_TOKEN
    ]
    for reference, data in cases:
        assert image(server, replicate_weights=reference) == inline(server, data), reference
    assert len({inline(server, data) for _, data in cases}) == len(cases)

    assert hf.api.hits[hf.resolve_path("hfuser/pair", "a.safetensors", main)] == 1
    private_info = [r for r in hf.api.requests if r.path.startswith("/api/models/hfuser/private")]
    assert private_info and all(r.authorization == f"Bearer {TOKENS['HF_TOKEN']}" for r in private_info)
    lfs = [r for r in fakes.cdn.requests if r.path.startswith("/hf-lfs/")]
    assert len(lfs) == len(cases) and all(r.authorization is None for r in lfs)
    assert_tokens_stayed_home(fakes, web)
    # A link copied from the browser percent-encodes the space: the same file, from the cache.
    copied = "https://huggingface.co/hfuser/nested/blob/main/loras/style%20one.safetensors"
    assert image(server, replicate_weights=copied) == inline(server, HF_NESTED)
    assert len([r for r in fakes.cdn.requests if r.path.startswith("/hf-lfs/")]) == len(cases)


def test_hf_co_is_the_same_repo_and_comes_from_the_cache(server: CogServer, fakes: FakeServices) -> None:
    hf, cdn = fakes.hf, fakes.cdn
    hf.add_repo("hfuser/cached", {"lora.safetensors": HF_CACHED})
    before = len([r for r in cdn.requests if r.path.startswith("/hf-lfs/")])
    first = image(server, replicate_weights="huggingface.co/hfuser/cached")
    assert image(server, replicate_weights="hf.co/hfuser/cached") == first
    assert image(server, replicate_weights="https://huggingface.co/hfuser/cached/tree/main") == first
    assert first == inline(server, HF_CACHED)
    assert len([r for r in cdn.requests if r.path.startswith("/hf-lfs/")]) == before + 1


# --- CivitAI ---------------------------------------------------------------------------------------


def test_civitai_takes_the_newest_safetensor_unless_a_version_is_named(
    server: CogServer, fakes: FakeServices, web: HttpFiles
) -> None:
    civitai = fakes.civitai
    civitai.add_model(
        4242,
        [(5002, {"new.safetensors": CIV_NEW}), (5001, {"old.safetensors": CIV_OLD})],
        token=TOKENS["CIVITAI_API_TOKEN"],
    )
    civitai.add_model(4343, [(5101, {"model.pt": b"pickled", "model.safetensors": CIV_MIXED})])
    newest = image(server, replicate_weights="civitai.com/models/4242")
    assert newest == inline(server, CIV_NEW)
    older = image(server, replicate_weights="https://civitai.com/models/4242/fox-style?modelVersionId=5001")
    assert older == inline(server, CIV_OLD) != newest
    assert image(server, replicate_weights="https://www.civitai.com/models/4343") == inline(server, CIV_MIXED)

    bearer = f"Bearer {TOKENS['CIVITAI_API_TOKEN']}"
    assert civitai.api.authorization(civitai.download_path(5002)) == [bearer]
    assert civitai.api.authorization(civitai.download_path(5001)) == [bearer]
    for version, name in ((5002, "new.safetensors"), (5001, "old.safetensors"), (5101, "model.safetensors")):
        assert fakes.cdn.authorization(cdn_path(civitai.file_urls[(version, name)], fakes.cdn)) == [None]
    assert fakes.cdn.hits[cdn_path(civitai.file_urls[(5101, "model.pt")], fakes.cdn)] == 0
    assert_tokens_stayed_home(fakes, web)


# --- plain URLs and data: URIs of archives ---------------------------------------------------------


def test_a_tar_by_plain_url_or_inline_gives_the_image_of_its_lora(server: CogServer, web: HttpFiles) -> None:
    url = web.serve("/files/trained_model.tar", make_tar({"output/lora.safetensors": PLAIN_TAR}))
    assert image(server, replicate_weights=url + "?download=1") == inline(server, PLAIN_TAR)
    archive = make_tar({REPLICATE_MEMBER: DATA_TAR, "output/README.md": b"trained"})
    assert image(server, extra_lora=data_uri(archive), extra_lora_scale=1.0) == image(
        server, extra_lora=data_uri(DATA_TAR), extra_lora_scale=1.0
    )
    assert image(server, replicate_weights=data_uri(archive)) == inline(server, DATA_TAR)
    assert web.hits["/files/trained_model.tar"] == 1


# --- hostile archives ------------------------------------------------------------------------------


def _expected(parts: tuple[str, ...]) -> bool:
    """The two folders, a finished cache file (named by its key's hash), or an output folder's content."""
    if parts in {("cache",), ("tmp",)}:
        return True
    if parts[0] == "cache":
        return len(parts) == 2 and re.fullmatch(r"[0-9a-f]{40}\.safetensors", parts[1]) is not None
    return parts[0] == "tmp" and parts[1].startswith("flux-day-out-")


def server_files(root: Path) -> list[str]:
    """What the server left under `root` besides what `_expected` allows: should be nothing."""
    found = []
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts
        if path.is_symlink() or not _expected(parts):
            found.append("/".join(parts) + (" (a link)" if path.is_symlink() else ""))
    return found


def test_archives_with_paths_outside_the_cache_are_read_in_place_or_refused(
    server: CogServer, fakes: FakeServices, root: Path
) -> None:
    replicate = fakes.replicate
    outside = [root / "escape.safetensors", ROOT.parent / "escape.safetensors", root / "abs"]
    # Only the one LoRA member is read, and only as a stream: nothing else in the archive is written.
    replicate.add_weights(
        "mallory",
        "beside",
        make_tar({"../escape.safetensors": DECOY, "../../abs/x": b"x", REPLICATE_MEMBER: BESIDE_ESCAPE}),
    )
    assert image(server, replicate_weights="mallory/beside") == inline(server, BESIDE_ESCAPE)
    # An absolute name is taken as relative (tarfile's data filter strips the slash).
    replicate.add_weights("mallory", "absolute", make_tar({"/abs/lora.safetensors": ABSOLUTE}))
    result = server.predict(**FAST, replicate_weights="mallory/absolute")
    if result["status"] == "succeeded":
        assert image(server, replicate_weights="mallory/absolute") == inline(server, ABSOLUTE)
    else:
        assert "replicate_weights" in result["error"], result["error"]
    assert not any(path.exists() for path in outside)
    assert server_files(root) == []


# --- failures --------------------------------------------------------------------------------------

Make = Callable[[FakeServices, HttpFiles], str]


def _replicate(owner: str, model: str, body: bytes, ask: str | None = None, **weights: str) -> Make:
    """Serve `body` as owner/model's weights (`weights`: `add_weights`' filename, version, token); the
    reference is `ask`, else owner/model."""

    def make(fakes: FakeServices, web: HttpFiles) -> str:
        fakes.replicate.add_weights(owner, model, body, **weights)
        return ask or f"{owner}/{model}"

    return make


def _hf(repo: str, files: dict[str, bytes], reference: str, token: str | None = None) -> Make:
    def make(fakes: FakeServices, web: HttpFiles) -> str:
        fakes.hf.add_repo(repo, files, token=token)
        return reference

    return make


def _civitai(model_id: int, versions: list[tuple[int, dict[str, bytes]]], reference: str, **kw: str) -> Make:
    def make(fakes: FakeServices, web: HttpFiles) -> str:
        fakes.civitai.add_model(model_id, versions, **kw)
        return reference

    return make


BIG_MEMBER = make_tar({REPLICATE_MEMBER: bytes(MAX_LORA_BYTES + 1)}, compression="gz")
# name -> (how to make the reference, what the error must say)
BAD: dict[str, tuple[Make, tuple[str, ...]]] = {
    "replicate-missing-model": (lambda f, w: "nobody/nothing", ("nobody/nothing", "HTTP 404")),
    "replicate-missing-version": (
        _replicate("bob", "known", make_tar({REPLICATE_MEMBER: DECOY}), version="v1", ask="bob/known/v2"),
        ("bob/known/v2", "HTTP 404"),
    ),
    "replicate-private-other-token": (
        _replicate("bob", "private", make_tar({REPLICATE_MEMBER: DECOY}), token="r8_OTHERS"),
        ("HTTP 401", "REPLICATE_API_TOKEN"),
    ),
    "replicate-oversized": (
        _replicate("bob", "huge", bytes(MAX_LORA_BYTES + 1), filename="lora.safetensors"),
        ("larger than 2000000 bytes", "FLUX_DAY_MAX_LORA_BYTES"),
    ),
    "replicate-oversized-member": (
        _replicate("bob", "bomb", BIG_MEMBER, filename="trained_model.tar.gz"),
        ("larger than 2000000 bytes",),
    ),
    "replicate-tar-without-safetensors": (
        _replicate("bob", "empty", make_tar({"output/README.md": b"no weights"})),
        ("no .safetensors",),
    ),
    "replicate-tar-two-loras": (
        _replicate("bob", "two", make_tar({"a/x.safetensors": DECOY, "b/y.safetensors": DECOY})),
        ("a/x.safetensors", "b/y.safetensors"),
    ),
    "tar-symlink-to-passwd": (
        _replicate("mallory", "symlink", make_tar({}, links={REPLICATE_MEMBER: "/etc/passwd"})),
        ("unsafe",),
    ),
    "tar-relative-symlink-out": (
        _replicate("mallory", "uplink", make_tar({}, links={"lora.safetensors": "../../../../etc/passwd"})),
        ("unsafe",),
    ),
    "tar-hardlink-to-passwd": (
        _replicate("mallory", "hardlink", make_tar({}, hardlinks={REPLICATE_MEMBER: "/etc/passwd"})),
        ("unsafe",),
    ),
    "tar-dotdot-lora": (
        _replicate("mallory", "dotdot", make_tar({"../lora.safetensors": DECOY})),
        ("unsafe",),
    ),
    "hf-ambiguous": (
        _hf(
            "hfbad/ambiguous",
            {"a.safetensors": DECOY, "b.safetensors": DECOY},
            "huggingface.co/hfbad/ambiguous",
        ),
        ("a.safetensors", "b.safetensors", "blob/main"),
    ),
    "hf-missing-repo": (lambda f, w: "huggingface.co/hfbad/nope", ("hfbad/nope", "not found")),
    "hf-private-other-token": (
        _hf("hfbad/private", {"lora.safetensors": DECOY}, "huggingface.co/hfbad/private", token="hf_OTHERS"),
        ("hfbad/private", "HF_TOKEN"),
    ),
    "hf-missing-file": (
        _hf(
            "hfbad/some", {"lora.safetensors": DECOY}, "huggingface.co/hfbad/some/blob/main/other.safetensors"
        ),
        ("other.safetensors",),
    ),
    "hf-missing-revision": (
        _hf(
            "hfbad/some",
            {"lora.safetensors": DECOY},
            "huggingface.co/hfbad/some/resolve/nope/lora.safetensors",
        ),
        ("nope",),
    ),
    "civitai-pickle-only": (
        _civitai(4444, [(5201, {"lora.pt": b"pickled"})], "civitai.com/models/4444"),
        ("SafeTensor",),
    ),
    "civitai-missing-model": (lambda f, w: "civitai.com/models/999999", ("HTTP 404",)),
    "civitai-missing-version": (
        _civitai(4545, [(5301, {"x.safetensors": DECOY})], "civitai.com/models/4545?modelVersionId=1"),
        ("no version 1",),
    ),
    "civitai-private-other-token": (
        _civitai(4646, [(5401, {"x.safetensors": DECOY})], "civitai.com/models/4646", token="civ_OTHERS"),
        ("HTTP 401", "CIVITAI_API_TOKEN"),
    ),
    "url-signed-404": (
        lambda f, w: w.error("/signed.safetensors", 404) + "?X-Amz-Signature=abc&token=hunter2",
        ("HTTP 404",),
    ),
}
INPUTS = ("replicate_weights", "extra_lora")
CASES = [(name, input_name) for name in BAD for input_name in INPUTS]


@pytest.fixture(scope="module")
def good(server: CogServer) -> dict[str, tuple[dict[str, object], bytes]]:
    """For each input under test, the other input holding a working LoRA, and the image it gives."""
    chosen = {
        "replicate_weights": {"extra_lora": data_uri(GOOD), "extra_lora_scale": 0.7},
        "extra_lora": {"replicate_weights": data_uri(GOOD), "lora_scale": 0.7},
    }
    return {name: (inputs, image(server, **inputs)) for name, inputs in chosen.items()}


@pytest.mark.parametrize(("name", "input_name"), CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_a_failing_source_names_its_input_leaks_nothing_and_changes_nothing(
    server: CogServer,
    fakes: FakeServices,
    web: HttpFiles,
    root: Path,
    good: dict[str, tuple[dict[str, object], bytes]],
    name: str,
    input_name: str,
) -> None:
    make_ref, says = BAD[name]
    other, before = good[input_name]
    result = server.predict(**FAST, **other, **{input_name: make_ref(fakes, web)})
    assert result["status"] == "failed", result
    error = result["error"]
    assert re.search(rf"\b{input_name}\b", error), error
    for words in says:
        assert words in error, error
    for leak in (*LEAKS, "/etc/passwd", str(root)):
        assert leak not in error, error
        assert leak not in (result.get("logs") or ""), result["logs"]
    assert server.becomes_ready()
    assert image(server, **other) == before
    assert list((root / "cache").glob(".partial-*")) == []
    assert server_files(root) == []


def test_after_all_that_no_token_left_its_host_and_the_log_holds_no_secret(
    server: CogServer, fakes: FakeServices, web: HttpFiles, root: Path, log_path: Path
) -> None:
    assert_tokens_stayed_home(fakes, web)
    assert server_files(root) == []
    assert not (ROOT.parent / "escape.safetensors").exists()
    log = log_path.read_text(errors="replace")
    assert "downloaded" in log  # the log is being written: an empty one would prove nothing
    for leak in ("SECRETTOKEN", "X-Amz-Signature"):
        assert leak not in log, [line for line in log.splitlines() if leak in line][:5]


# --- restart ---------------------------------------------------------------------------------------


def test_a_restarted_server_finds_pinned_loras_in_its_disk_cache_without_the_network(
    tiny_weights: Path, tmp_path: Path
) -> None:
    cache, tmp = tmp_path / "cache", tmp_path / "tmp"
    tmp.mkdir()
    pinned = f"alice/restart/{VERSION}"
    with FakeServices() as own:
        plain = own.cdn.serve("/plain/restart.safetensors", RESTART_PLAIN)
        own.replicate.add_model("alice", "restart", RESTART_PINNED, version=VERSION)
        env = sources_env(tiny_weights, own, cache, tmp)
        asks = [
            {"replicate_weights": plain},
            {"replicate_weights": pinned},
            {"replicate_weights": plain, "extra_lora": pinned, "extra_lora_scale": 0.5},
        ]
        with CogServer.ready(env, tmp_path / "first.log") as first:
            images = [image(first, **ask) for ask in asks]
            inlined = [
                image(first, replicate_weights=data_uri(data)) for data in (RESTART_PLAIN, RESTART_PINNED)
            ]
        assert images[:2] == inlined and len(set(images)) == 3
        servers = (own.cdn, own.replicate.api, own.hf.api, own.civitai.api)
        seen = [len(server.requests) for server in servers]
        assert own.cdn.hits["/plain/restart.safetensors"] == 1
        assert own.replicate.api.hits[own.replicate.weights_path("alice", "restart", VERSION)] == 1
        assert own.failures() == []
    # The fakes are gone: the second server can only answer from its disk cache.
    with CogServer.ready(env, tmp_path / "second.log") as second:
        assert [image(second, **ask) for ask in asks] == images
    assert [len(server.requests) for server in servers] == seen
    assert list(cache.glob(".partial-*")) == []
    for log in ("first.log", "second.log"):
        assert "SECRETTOKEN" not in (tmp_path / log).read_text(errors="replace")
    assert "from the LoRA cache" in (tmp_path / "second.log").read_text(errors="replace")
