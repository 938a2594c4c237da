"""Which files a request may make the server read, and which inputs it may name, in-process."""

from __future__ import annotations

import asyncio
import inspect
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cog import Input
from cog.types import Path as CogPath

from flux_day.errors import InputError
from flux_day.serving import client_file, declared_inputs_only


@pytest.fixture
def upload() -> Iterator[Path]:
    """A file as coglet makes one from a URL or data: URI (`cog.types.URLPath.convert`)."""
    with tempfile.NamedTemporaryFile(suffix="file.png", delete=False) as handle:
        handle.write(b"png")
    yield CogPath(handle.name)
    os.unlink(handle.name)


def test_only_the_files_cog_made_from_an_upload_are_read(upload: Path, tmp_path: Path) -> None:
    assert client_file("image", upload) == upload
    assert client_file("mask", None) is None
    inside = Path(tempfile.gettempdir())
    link = inside / f"tmp-link-{os.getpid()}.png"
    link.symlink_to(upload)
    nested = tmp_path / "tmpnested.png"  # an earlier output's folder, say
    nested.write_bytes(b"png")
    try:
        for value in (
            str(upload),
            f"file://{upload}",
            CogPath("/etc/hostname"),
            CogPath(link),
            CogPath(nested),
            7,
        ):
            with pytest.raises(
                InputError, match=r"^image: give the image as an http\(s\) URL or a data: URI"
            ):
                client_file("image", value)
    finally:
        link.unlink()


class Runner:
    async def run(self, prompt: str = Input(description="p"), steps: int = Input(default=28, ge=1)) -> str:
        return f"{prompt}:{steps}"


def test_unknown_inputs_are_refused_by_name_and_omitted_ones_get_their_defaults() -> None:
    run = declared_inputs_only(Runner().run)
    assert inspect.iscoroutinefunction(run)  # coglet runs a `run` concurrently only if it is one
    assert asyncio.run(run(prompt="fox")) == "fox:28" and asyncio.run(run(prompt="fox", steps=3)) == "fox:3"
    with pytest.raises(
        InputError, match=r"^foo: not an input of this model; .* The inputs are: prompt, steps\.$"
    ):
        asyncio.run(run(prompt="fox", foo=1))
