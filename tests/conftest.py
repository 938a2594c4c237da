"""Shared fixtures: one tiny-weights tree per session (the same code as the script) and a Cog server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flux_day.weights.tiny import write_tiny_weights
from tests.cog_server import CogServer


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def server_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's TMPDIR, so tests can see what files it leaves behind."""
    return tmp_path_factory.mktemp("server-tmp")


@pytest.fixture(scope="session")
def cog_server(
    tiny_weights: Path, server_tmp: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CogServer]:
    env = {"FLUX_DAY_WEIGHTS": str(tiny_weights), "FLUX_DAY_OFFLINE": "1", "TMPDIR": str(server_tmp)}
    with CogServer.ready(env, tmp_path_factory.mktemp("logs") / "cog.log") as server:
        yield server
