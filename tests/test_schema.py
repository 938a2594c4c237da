"""The predictor's inputs, read by cog's own inspector, are the published schema field for field."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
from cog._adt import Repetition

from flux_day.schema import INPUTS
from scripts.openapi_schema import read_predictor
from tests.harness.seed_schema import seed_schema

ROOT = Path(__file__).resolve().parents[1]
SHARED_SEED = ROOT.parent / "shared" / "seed" / "input_schema.json"


@pytest.fixture(scope="module")
def predictor_info() -> Any:
    return read_predictor(ROOT)


def test_copy_of_the_seed_is_current() -> None:
    if not SHARED_SEED.exists():
        pytest.skip("no ../shared beside this checkout")
    assert json.loads(SHARED_SEED.read_text()) == seed_schema()


def test_inputs_match_the_published_schema(predictor_info: Any) -> None:
    predictor_inputs = predictor_info.inputs
    seed = seed_schema()["inputs"]
    assert list(predictor_inputs) == [field["name"] for field in seed]
    for field in seed:
        ours = predictor_inputs[field["name"]]
        name = field["name"]
        json_type = ours.type.json_type()
        expected_type = "string" if field["type"] == "enum(string)" else field["type"]
        assert json_type["type"] == expected_type, name
        assert json_type.get("format") == field.get("format"), name
        required = ours.type.repetition is Repetition.REQUIRED and ours.default is None
        assert required == field.get("required", False), name
        assert ours.default == field.get("default"), name
        assert type(ours.default) is type(field.get("default")) or expected_type == "number", name
        assert ours.ge == field.get("minimum"), name
        assert ours.le == field.get("maximum"), name
        assert ours.choices == field.get("choices"), name
        assert ours.description == field["description"], name


def test_output_is_a_list_of_files(predictor_info: Any) -> None:
    assert predictor_info.output.json_type() == seed_schema()["output"]


def test_the_schema_table_is_the_published_schema() -> None:
    """`flux_day.schema`, read from predict.py's literals, is what the checks and the CLI use."""
    kinds = {"string": {"text", "file"}, "enum(string)": {"text"}, "integer": {"integer"}}
    kinds |= {"number": {"number"}, "boolean": {"boolean"}}
    seed = seed_schema()["inputs"]
    assert [field.name for field in INPUTS] == [field["name"] for field in seed]
    for ours, field in zip(INPUTS, seed, strict=True):
        assert ours.kind in kinds[field["type"]], ours.name
        assert (ours.kind == "file") == (field.get("format") == "uri"), ours.name
        assert ours.description == field["description"], ours.name
        assert ours.default == field.get("default") and ours.required == field.get("required", False)
        assert list(ours.choices) == field.get("choices", []), ours.name
        assert ours.bounds == (None if "minimum" not in field else (field["minimum"], field["maximum"]))


def test_the_published_choices_are_the_products_own_tables() -> None:
    """Each choice the schema offers is one the product knows how to run, and each it runs is offered."""
    from flux_day.models import MODELS
    from flux_day.outputs import OUTPUT_FORMATS
    from flux_day.schema import SCHEMA
    from flux_day.sizes import ASPECT_RATIOS, CUSTOM, MEGAPIXEL_SIDE_SCALE

    assert SCHEMA["aspect_ratio"].choices == (*ASPECT_RATIOS, CUSTOM)
    assert SCHEMA["model"].choices == tuple(MODELS)
    assert SCHEMA["output_format"].choices == tuple(OUTPUT_FORMATS)
    assert SCHEMA["megapixels"].choices == tuple(MEGAPIXEL_SIDE_SCALE)


def _as_cog_reads_it(text: str) -> Any:
    """A keyword's source text as cog's static schema generator (`pkg/schema/python/literals.go`)
    takes it: a string loses its outer quotes and nothing else (no escapes processed, implicitly
    concatenated strings kept with their inner quotes); other literals parse as Python's do."""
    for quote in ('"""', "'''", '"', "'"):
        if text.startswith(quote):
            return text[len(quote) : len(text) - len(quote)]
    value = ast.literal_eval(text)
    return [_as_cog_reads_it(repr(v).replace("'", '"')) for v in value] if isinstance(value, list) else value


def test_cog_build_reads_the_published_schema_from_predict_py_without_running_it() -> None:
    """`cog build` parses predict.py statically: each input must be an `Input(...)` of literals, and each
    description one string literal, or the built image's schema differs from the published one."""
    source = (ROOT / "predict.py").read_text()
    run = next(
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "run"
    )
    parameters = run.args.args[1:]
    seed = seed_schema()["inputs"]
    assert [p.arg for p in parameters] == [field["name"] for field in seed]
    for parameter, default, field in zip(parameters, run.args.defaults, seed, strict=True):
        assert isinstance(default, ast.Call) and getattr(default.func, "id", None) == "Input", field["name"]
        read = {
            kw.arg: _as_cog_reads_it(ast.get_source_segment(source, kw.value) or "")
            for kw in default.keywords
        }
        expected = {"description": field["description"]}
        if not field.get("required"):
            expected["default"] = field.get("default")
        expected |= {
            key: field[seed_key]
            for key, seed_key in (("ge", "minimum"), ("le", "maximum"), ("choices", "choices"))
            if seed_key in field
        }
        assert read == expected, parameter.arg
