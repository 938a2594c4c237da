"""Shared fixtures: one tiny-weights tree per session (the same code as the script) and a Cog server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flux_day.weights.tiny import write_tiny_weights
from tests.harness.cog_server import CogServer, server_env


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
    with CogServer.ready(
        server_env(tiny_weights, server_tmp), tmp_path_factory.mktemp("logs") / "cog.log"
    ) as server:
        yield server
