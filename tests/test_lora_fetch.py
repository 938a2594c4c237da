"""Downloads in-process: one download for concurrent requests, trusted hosts only as configured,
tokens only where they belong, and hub resolution pinned to a commit."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from flux_day.config import Settings
from flux_day.errors import InputError, LoraError
from flux_day.loras.downloads import LoraDownloads
from flux_day.loras.fetch import Fetcher
from flux_day.loras.manager import LoraManager
from flux_day.loras.refs import LoraRef, parse_ref
from tests.harness import lora_files as lf
from tests.harness.fake_services import FakeServices
from tests.harness.http_files import HttpFiles, Route

LORA = lf.to_bytes(lf.kohya(lf.random_lora(1)))


def manager(tmp_path: Path, **env: str) -> LoraManager:
    base = {"FLUX_DAY_WEIGHTS": str(tmp_path), "FLUX_DAY_LORA_CACHE": str(tmp_path / "cache")}
    return LoraManager(Settings.from_env(base | env))


def cached_bytes(loras: LoraManager, ref: LoraRef, input_name: str = "replicate_weights") -> bytes:
    """The cached file of `ref` as read for `input_name` (which the manager's errors name)."""
    with LoraError.for_input(input_name), loras.downloads.cached_file(ref) as path:
        return path.read_bytes()


def test_concurrent_requests_for_one_url_download_it_once(tmp_path: Path) -> None:
    with HttpFiles() as files:
        url = files.slow("/a.safetensors", LORA, pieces=4, delay_s=0.05)
        loras = manager(tmp_path, FLUX_DAY_ALLOW_PRIVATE_URLS="1")
        got: list[bytes] = []
        ref = parse_ref(url)
        threads = [threading.Thread(target=lambda: got.append(cached_bytes(loras, ref))) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert files.hits["/a.safetensors"] == 1
        assert got == [LORA] * 3


def test_a_service_host_is_trusted_but_not_a_private_address_it_redirects_to(tmp_path: Path) -> None:
    """The operator's FLUX_DAY_REPLICATE_URL may be internal; its redirects are checked like user URLs."""
    with FakeServices() as services:
        services.replicate.add_model("o", "m", LORA, version="v1")
        settings = Settings.from_env(services.env() | {"FLUX_DAY_WEIGHTS": str(tmp_path)})
        with pytest.raises(InputError, match=r"^replicate_weights: .*private network address"):
            cached_bytes(manager(tmp_path, **services.env()), parse_ref("o/m/v1"))
        assert list((tmp_path / "lora-cache").glob("*")) == []
        # The service itself (on 127.0.0.1, as configured) was reached: it answered the redirect.
        weights = services.replicate.base + services.replicate.weights_path("o", "m", "v1")
        with Fetcher(settings).open(parse_ref("o/m/v1"), weights, follow=False) as answer:
            assert answer.is_redirect
        assert services.replicate.api.hits[services.replicate.weights_path("o", "m", "v1")] == 2


def test_tokens_go_to_their_own_service_and_never_to_its_cdn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_SECRET")
    monkeypatch.setenv("CIVITAI_API_TOKEN", "civ_SECRET")
    with FakeServices() as services:
        services.replicate.add_model("o", "m", LORA, version="v1", token="r8_SECRET")
        services.civitai.add_model(7, versions=[(70, {"style.safetensors": LORA})], token="civ_SECRET")
        loras = manager(tmp_path, FLUX_DAY_ALLOW_PRIVATE_URLS="1", **services.env())
        for source in ("o/m/v1", "civitai.com/models/7"):
            assert cached_bytes(loras, parse_ref(source), "extra_lora") == LORA
        for request in services.cdn.requests:
            assert request.authorization is None, request.path
        sent = [r.authorization for r in services.replicate.api.requests + services.civitai.api.requests]
        assert "Bearer r8_SECRET" in sent and "Bearer civ_SECRET" in sent
        assert all(token in {None, "Bearer r8_SECRET", "Bearer civ_SECRET"} for token in sent)


def test_hugging_face_files_are_pinned_to_the_listed_commit(tmp_path: Path) -> None:
    with FakeServices() as services:
        commit = services.hf.add_repo("o/r", {"README.md": b"hi", "my_lora.safetensors": LORA})
        settings = Settings.from_env(services.env() | {"FLUX_DAY_WEIGHTS": str(tmp_path)})
        plan = LoraDownloads(settings).plan(parse_ref("huggingface.co/o/r"))
        assert f"/resolve/{commit}/my_lora.safetensors" in plan.url
        assert plan.key == f"huggingface:o/r@{commit}/my_lora.safetensors"


def test_a_connection_that_lands_on_a_private_address_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the check before the request passed (public answer), the connect lands on loopback."""
    monkeypatch.setattr(Fetcher, "_check_destination", lambda self, url: None)
    with HttpFiles() as files:
        url = files.serve("/a.safetensors", LORA)
        with pytest.raises(InputError, match=r"^extra_lora: .*private network address"):
            cached_bytes(manager(tmp_path), parse_ref(url), "extra_lora")
        assert files.hits["/a.safetensors"] == 0
        assert cached_bytes(manager(tmp_path, FLUX_DAY_ALLOW_PRIVATE_URLS="1"), parse_ref(url), "extra_lora")


@pytest.mark.parametrize("stall", ["before the answer", "during the body"])
def test_a_host_that_stalls_gets_a_timeout_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stall
) -> None:
    monkeypatch.setattr("flux_day.loras.fetch.READ_TIMEOUT_S", 0.2)
    with HttpFiles() as files:
        if stall == "before the answer":
            url = files.add("/a.safetensors", Route(chunks=(LORA,), header_delay_s=1.0))
        else:
            url = files.slow("/a.safetensors", LORA, pieces=3, delay_s=1.0)
        with pytest.raises(InputError, match=r"^replicate_weights: .*(did not answer|stalled).*0\.2 s"):
            cached_bytes(manager(tmp_path, FLUX_DAY_ALLOW_PRIVATE_URLS="1"), parse_ref(url))
        assert [p for p in (tmp_path / "cache").iterdir()] == []


def test_a_safetensors_header_declares_its_size_however_much_of_the_body_is_in() -> None:
    from flux_day.loras.safetensors_file import declared_size

    header_end = 8 + int.from_bytes(LORA[:8], "little")
    for end in (1, 5, 9, 100, header_end - 1):
        assert declared_size(LORA[:end]) == ((header_end, None) if end >= 9 else (0, None)), end
    for end in (header_end, len(LORA)):
        assert declared_size(LORA[:end]) == (header_end, len(LORA)), end
    assert declared_size(b"lora.safetensors\0\0\0\0") == (0, None)  # a tar member name: declares nothing
    bomb = (10**12).to_bytes(8, "little") + b"{"  # a header length alone past any limit
    assert declared_size(bomb) == (10**12 + 8, None)


def test_a_gzip_encoded_download_is_checked_against_its_wire_length(tmp_path: Path) -> None:
    import gzip

    with HttpFiles() as files:
        encoded = gzip.compress(LORA)
        url = files.add("/z.safetensors", Route(chunks=(encoded,), headers=(("Content-Encoding", "gzip"),)))
        loras = manager(tmp_path, FLUX_DAY_ALLOW_PRIVATE_URLS="1")
        with loras.downloads.cached_file(parse_ref(url)) as path:
            assert path.read_bytes() == LORA
        short = files.add(
            "/short.safetensors",
            Route(
                chunks=(encoded,), headers=(("Content-Encoding", "gzip"),), content_length=len(encoded) + 10
            ),
        )
        with (
            pytest.raises(InputError, match=r"^replicate_weights: the download of .* broke off"),
            LoraError.for_input("replicate_weights"),
            loras.downloads.cached_file(parse_ref(short)),
        ):
            pass
        assert list((tmp_path / "cache").glob(".partial-*")) == []


def test_a_refused_connection_says_so_and_a_private_address_names_the_setting(tmp_path: Path) -> None:
    from tests.harness.cog_server import free_port

    url = f"http://127.0.0.1:{free_port()}/style.safetensors"  # nothing listens there
    allowed = Settings.from_env({"FLUX_DAY_WEIGHTS": str(tmp_path), "FLUX_DAY_ALLOW_PRIVATE_URLS": "1"})
    with pytest.raises(LoraError, match="refused the connection") as refused:
        Fetcher(allowed).open(parse_ref(url), url)
    assert "did not answer" not in str(refused.value)
    with pytest.raises(LoraError, match="FLUX_DAY_ALLOW_PRIVATE_URLS=1"):
        Fetcher(Settings.from_env({"FLUX_DAY_WEIGHTS": str(tmp_path)})).open(parse_ref(url), url)
