"""Shared fixtures: one tiny-weights tree per session (the same code as the script), engines on it, a Cog
server, and per module an HTTP file server and the no-LoRA image of the module's own `server`."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

from flux_day.engine import Engine
from scripts.random_weights.tree import write_tiny_weights
from tests.harness.cog_server import CogServer, server_env
from tests.harness.engines import RECIPES, EngineFactory, cpu_engine, cuda_recipe_on_cpu
from tests.harness.http_files import HttpFiles
from tests.harness.lora_files import FAST


@pytest.fixture(scope="session", autouse=True)
def _cuda_recipe_runs_on_cpu() -> Iterator[None]:
    """The production fp8 recipe runs on this CPU for the whole session (`cuda_recipe_on_cpu`)."""
    with cuda_recipe_on_cpu():
        yield


@pytest.fixture(scope="module", params=list(RECIPES))
def recipe(request: pytest.FixtureRequest) -> str:
    """Each fp8 recipe in turn (ids `weight-only`, `production`): a go_fast test runs under both."""
    return request.param


@pytest.fixture(scope="module")
def fast_engine(make_engine: EngineFactory, recipe: str) -> Engine:
    """A CPU engine in `recipe`, one per test module and recipe."""
    return make_engine(recipe=recipe)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def make_engine(tiny_weights: Path) -> EngineFactory:
    """`make_engine(FLUX_DAY_X="...", budget=..., default_lora=...)`: a new Engine on the tiny weights on
    the CPU, with these settings over the defaults (`tests.harness.engines.cpu_engine`)."""
    return functools.partial(cpu_engine, tiny_weights)


@pytest.fixture(scope="module")
def engine(make_engine: EngineFactory) -> Engine:
    """The default CPU engine, one per test module: what one module fuses or builds stays its own."""
    return make_engine()


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


@pytest.fixture(scope="module")
def base(server: CogServer) -> bytes:
    """The image the module's own `server` fixture makes of the harness's FAST inputs, without a LoRA."""
    (raw,) = server.images(**FAST)
    return raw


@pytest.fixture(scope="module")
def files() -> Iterator[HttpFiles]:
    """A real HTTP server on 127.0.0.1 for the module's LoRA and image URLs."""
    with HttpFiles() as http:
        yield http
