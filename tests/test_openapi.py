"""`.cog/openapi_schema.json`, written by `scripts/write_openapi_schema.py` as `cog build` would write it:
the published inputs field for field, and a real Cog server that, given it, turns bad inputs away at the
door (422), still serves good ones, and survives whatever requests the schema lets a fuzzer make.

The server runs in a copy of the repository root made of links (`schema_root`), so the file written
there never reaches the servers of other tests, which check that the predictor alone catches bad input.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode

from flux_day.serving import INTERNAL_ERROR
from tests.harness.cog_server import ROOT, CogServer, decode_output, linked_root, open_image, server_env
from tests.harness.seed_schema import seed_schema

FAST = {"num_inference_steps": 2, "megapixels": "0.25", "seed": 1234}
# Downloads the server would make for generated URLs (image, mask, LoRAs) go nowhere: port 9 refuses.
NOWHERE = "http://127.0.0.1:9"
OFFLINE = {
    **{name: NOWHERE for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
    **{name: "" for name in ("NO_PROXY", "no_proxy")},
    **{name: NOWHERE for name in ("FLUX_DAY_REPLICATE_URL", "FLUX_DAY_CIVITAI_URL", "HF_ENDPOINT")},
}
EXAMPLES = 100  # about 15 s on 2 cores
TRACEBACK_SIGNS = ("Traceback (most recent call last)", 'File "/', "site-packages")


@pytest.fixture(scope="module")
def schema_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository root as links (all but `.cog/`), with the schema written into it by the script."""
    root = linked_root(tmp_path_factory.mktemp("schema-root"))
    out = root / ".cog" / "openapi_schema.json"
    script = ROOT / "scripts" / "write_openapi_schema.py"
    written = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True)
    assert written.returncode == 0 and out.is_file(), written.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def document(schema_root: Path) -> dict[str, Any]:
    return json.loads((schema_root / ".cog" / "openapi_schema.json").read_text())


@pytest.fixture(scope="module")
def schema_server(
    tiny_weights: Path, schema_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CogServer]:
    env = server_env(tiny_weights, tmp_path_factory.mktemp("schema-server-tmp"), **OFFLINE)
    log = tmp_path_factory.mktemp("schema-server-logs") / "cog.log"
    with CogServer.ready(env, log, cwd=schema_root) as server:
        yield server


def resolve(document: dict[str, Any], ref: str) -> dict[str, Any]:
    """What a local `$ref` (`#/components/schemas/...`) points at; KeyError if nothing."""
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


# --- the document ------------------------------------------------------------------------------------


def test_inputs_are_the_published_schema_field_for_field(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    written = schemas["Input"]
    seed = seed_schema()["inputs"]
    assert written["type"] == "object" and written["title"] == "Input"
    order = sorted(written["properties"], key=lambda name: written["properties"][name]["x-order"])
    assert order == [field["name"] for field in seed]
    assert [written["properties"][name]["x-order"] for name in order] == list(range(len(seed)))
    assert written["required"] == [field["name"] for field in seed if field.get("required")]
    for field in seed:
        name = field["name"]
        prop = written["properties"][name]
        if "choices" in field:
            # Cog's way: the property refers to an enum schema of its own.
            assert prop["allOf"] == [{"$ref": f"#/components/schemas/{name}"}], name
            enum = resolve(document, prop["allOf"][0]["$ref"])
            assert enum["type"] == "string" and enum["enum"] == field["choices"], name
            assert "type" not in prop, name
        else:
            assert prop["type"] == field["type"], name
            assert prop.get("format") == field.get("format"), name
            assert prop["title"] == name.replace("_", " ").title(), name
        # Same value and same JSON type: a default of 3 is written 3, not 3.0.
        default = prop.get("default")
        assert default == field.get("default") and type(default) is type(field.get("default")), name
        for bound in ("minimum", "maximum"):
            assert prop.get(bound) == field.get(bound), (name, bound)
        assert prop["description"] == field["description"], name
        # An input the page shows without a default may be left out: nullable, never required.
        if "default" not in field and not field.get("required"):
            assert prop.get("nullable") is True, name


def test_output_is_a_list_of_uris(document: dict[str, Any]) -> None:
    output = document["components"]["schemas"]["Output"]
    assert output == {"title": "Output", "type": "array", "items": {"type": "string", "format": "uri"}}
    assert output == seed_schema()["output"]


def test_the_prediction_route_is_described_with_resolvable_references(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.0.2"
    post = document["paths"]["/predictions"]["post"]
    request = resolve(document, post["requestBody"]["content"]["application/json"]["schema"]["$ref"])
    response = resolve(document, post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"])
    assert request["properties"]["input"] == {"$ref": "#/components/schemas/Input"}
    assert response["properties"]["output"] == {"$ref": "#/components/schemas/Output"}
    refs: list[str] = []

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            refs.extend([node["$ref"]] if "$ref" in node else [])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(document)
    assert len(refs) > 10
    for ref in refs:
        assert isinstance(resolve(document, ref), dict), ref


# --- the server with the document in place -----------------------------------------------------------


def test_server_serves_the_written_schema(schema_server: CogServer, document: dict[str, Any]) -> None:
    with urllib.request.urlopen(f"{schema_server.url}/openapi.json", timeout=10) as response:
        assert json.load(response) == document


AT_THE_DOOR = [
    ({"num_outputs": 5}, "num_outputs", "greater than the maximum of 4"),
    ({"height": 2000}, "height", "greater than the maximum of 1440"),
    ({"width": 255}, "width", "less than the minimum of 256"),
    ({"guidance_scale": 10.5}, "guidance_scale", "maximum of 10"),
    ({"prompt_strength": -0.1}, "prompt_strength", "minimum of 0"),
    ({"lora_scale": 4}, "lora_scale", "maximum of 3"),
    ({"num_inference_steps": 2.5}, "num_inference_steps", 'not of type "integer"'),
    ({"num_outputs": "three"}, "num_outputs", 'not of type "integer"'),
    ({"model": "pro"}, "model", '"pro" is not one of ["dev","schnell"]'),
    ({"aspect_ratio": "7:5"}, "aspect_ratio", '"7:5" is not one of'),
    ({"output_format": "gif"}, "output_format", '"gif" is not one of ["webp","jpg","png"]'),
    ({"megapixels": "2"}, "megapixels", "is not one of"),
    ({"prompt": None}, "prompt", "Field required"),
]


@pytest.mark.parametrize(("change", "named", "says"), AT_THE_DOOR, ids=[n for _, n, _ in AT_THE_DOOR])
def test_bad_input_is_rejected_at_the_door(
    schema_server: CogServer, change: dict, named: str, says: str
) -> None:
    inputs = {k: v for k, v in ({"prompt": "a fox", **FAST} | change).items() if v is not None}
    result = schema_server.predict(**inputs)
    # A 422 with pydantic-style details: the predictor never saw the request.
    assert result["http_status"] == 422, result
    details = [d for d in result["detail"] if d["loc"] == ["body", "input", named]]
    assert details, result
    assert any(says in d["msg"] for d in details), details


def test_good_input_is_still_served(schema_server: CogServer) -> None:
    result = schema_server.predict(prompt="a fox", num_outputs=2, output_format="png", **FAST)
    assert result["status"] == "succeeded", result.get("error") or result
    assert [open_image(decode_output(uri)).size for uri in result["output"]] == [(512, 512)] * 2


def test_what_a_schema_cannot_say_is_still_checked_by_the_predictor(schema_server: CogServer) -> None:
    # Each value is in the schema; the combination is not allowed: the predictor fails it by name.
    result = schema_server.predict(prompt="a fox", aspect_ratio="custom", width=512, **FAST)
    assert result["status"] == "failed", result
    assert "height" in result["error"], result["error"]


def test_an_unknown_input_never_reaches_the_predictor_with_the_schema(schema_server: CogServer) -> None:
    """With the schema, coglet 0.23 drops inputs it does not declare before the worker sees them (it keeps
    Replicate's API lenient, cog#2943) and names them in its own log: the prediction is the one without
    them, so no Python error reaches the user. (Without the schema the predictor refuses them by name:
    tests/test_hostile_requests.py.)"""
    plain = schema_server.predict(prompt="a fox", **FAST)
    with_unknown = schema_server.predict(prompt="a fox", foo=1, **FAST)
    assert with_unknown["status"] == "succeeded", with_unknown.get("error")
    assert with_unknown["output"] == plain["output"]
    assert "Stripped unknown input fields" in schema_server.log_path.read_text()


def test_an_explicit_null_is_turned_away(schema_server: CogServer) -> None:
    # Cog's `nullable` means "may be left out": a null sent for an optional input fails its type check.
    result = schema_server.predict(
        prompt="a fox", seed=None, **{k: v for k, v in FAST.items() if k != "seed"}
    )
    assert result["http_status"] == 422, result
    assert result["detail"] == [
        {"loc": ["body", "input", "seed"], "msg": 'null is not of type "integer"', "type": "value_error"}
    ]


# --- generated requests -------------------------------------------------------------------------------

# In-range values of the costly inputs are capped (tiny weights on CPU: 28 steps at 1 megapixel take
# seconds); out-of-range ones are left alone so negative examples stay negative.
CHEAPER = {"num_inference_steps": (1, 50, 2), "num_outputs": (1, 4, 2), "width": (256, 1440, 512)}
CHEAPER["height"] = CHEAPER["width"]


def runnable(case: Case) -> Case:
    """The same request made cheap to run: fewer steps and outputs, smaller sizes, 0.25 megapixels.

    A valid example also leaves out the inputs it set to null, which is what `nullable` means to Cog
    (an explicit null is turned away, see above); otherwise most valid examples would stop at the door.
    """
    body = case.body
    inputs = body.get("input") if isinstance(body, dict) else None
    if not isinstance(inputs, dict):
        return case
    if case.meta and case.meta.generation.mode is GenerationMode.POSITIVE:
        for name in [name for name, value in inputs.items() if value is None]:
            del inputs[name]
    inputs.setdefault("num_inference_steps", 1)  # its default, 28, is the costliest part of a request
    for name, (low, high, cap) in CHEAPER.items():
        value = inputs.get(name)
        if type(value) is int and low <= value <= high:
            inputs[name] = min(value, cap)
    if inputs.get("megapixels", "1") == "1":
        inputs["megapixels"] = "0.25"
    return case


def request_strategy(document: dict[str, Any]) -> st.SearchStrategy[Case]:
    """Valid and invalid `POST /predictions` bodies from the served document, always with an `input`.

    Cog's document leaves the body and its `input` optional, so most generated requests would carry
    none and only meet the missing prompt; requiring both here spends the examples on the inputs.
    """
    document = copy.deepcopy(document)
    document["paths"]["/predictions"]["post"]["requestBody"]["required"] = True
    document["components"]["schemas"]["PredictionRequest"]["required"] = ["input"]
    operation = schemathesis.openapi.from_dict(document)["/predictions"]["POST"]
    modes = [operation.as_strategy(mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    return st.one_of(modes).map(runnable)


def send(server: CogServer, case: Case) -> Any:
    """Send a case, retrying while the single slot is still being freed (409), as any client would."""
    deadline = time.monotonic() + 120
    while True:
        response = case.call(base_url=server.url, timeout=120)
        if response.status_code != 409 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def test_generated_requests_never_break_the_server(
    schema_server: CogServer, document: dict[str, Any]
) -> None:
    outcomes: list[tuple[GenerationMode | None, int, str]] = []

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,  # the same examples every run
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure shows the request as sent
        suppress_health_check=list(HealthCheck),
    )
    @given(case=request_strategy(document))
    def request_is_handled(case: Case) -> None:
        response = send(schema_server, case)
        mode = case.meta.generation.mode if case.meta else None
        result = response.json() if response.status_code == 200 else {}
        outcomes.append((mode, response.status_code, result.get("status", "")))
        assert response.status_code < 500, (case.body, response.text)
        for sign in TRACEBACK_SIGNS:
            assert sign not in response.text, (case.body, response.text)
        # What the document allows passes the door.
        assert mode is not GenerationMode.POSITIVE or response.status_code == 200, (case.body, response.text)
        if result.get("status") == "failed":
            # A clear message of ours or Cog's, never the predictor's catch-all for an internal error.
            assert result["error"] and INTERNAL_ERROR not in result["error"], (case.body, result["error"])
        elif result:
            assert result["status"] == "succeeded", result
            assert all(uri.startswith("data:image/") for uri in result["output"]), result["output"]

    request_is_handled()
    # The run met the door, the predictor's own checks and generation alike.
    assert {(GenerationMode.NEGATIVE, 422), (GenerationMode.POSITIVE, 200)} <= {o[:2] for o in outcomes}
    assert {"succeeded", "failed"} <= {status for _, _, status in outcomes}, outcomes
    assert schema_server.becomes_ready()
    result = schema_server.predict(prompt="a fox", **FAST)
    assert result["status"] == "succeeded", result.get("error") or result
