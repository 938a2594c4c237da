"""The published input schema, read from `predict.py`'s `Input(...)` literals (where `cog build` needs
them), and the check of a value against its row; the request and the CLI read it. Torch-free, so the CLI
refuses a bad value before loading anything.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

from flux_day.errors import InputError

Kind = Literal["text", "file", "integer", "number", "boolean"]
KINDS: Final[dict[str, Kind]] = {
    "str": "text",
    "Path": "file",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
}
# Beside the package in the repository, the Cog image and an editable install; a wheel carries it too.
PREDICT: Final = Path(__file__).resolve().parents[1] / "predict.py"
MAX_SEED: Final = 2**63 - 1  # seed + i must stay a valid torch seed


@dataclass(frozen=True)
class SchemaInput:
    """One published input; `default` None and not `required`: it may be left empty."""

    name: str
    kind: Kind
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()
    bounds: tuple[float, float] | None = None  # inclusive (minimum, maximum)
    description: str = ""

    def check(self, value: Any) -> Any:
        """`value` as it is used, or an `InputError`; files pass as they are, for the request to read."""
        name = self.name
        if value is None and self.default is None:
            if self.required:  # the prompt
                raise InputError(f"{name}: missing; give a text prompt describing the image.")
            return None  # left empty, as the schema allows
        if self.kind == "file":
            return value
        if self.kind == "boolean":
            if not isinstance(value, bool):
                raise InputError(f"{name}: {shown(value)} is not a boolean; give true or false.")
            return value
        if self.choices:
            if value not in self.choices:
                allowed = ", ".join(self.choices)
                raise InputError(f"{name}: {shown(value)} is not one of the choices; use one of {allowed}.")
            return value
        if self.kind == "text":
            if not isinstance(value, str):
                fix = "give a text prompt" if self.required else "give a string or leave it empty"
                raise InputError(f"{name}: {shown(value)} is not text; {fix}.")
            return value if self.required else value.strip() or None
        return self._number(value)

    def _number(self, value: Any) -> int | float:
        """A number within the bounds; JSON clients may send 2.0 for the integer 2."""
        whole = self.kind == "integer"
        kind = "an integer" if whole else "a number"
        wrong = isinstance(value, bool) or not isinstance(value, int | float)
        if isinstance(value, float):
            wrong = not (value.is_integer() if whole else math.isfinite(value))
        if wrong:
            raise InputError(
                f"{self.name}: {shown(value)} is not {kind}; give {'a whole number' if whole else kind}."
            )
        low, high = self.bounds or (0, MAX_SEED)  # the seed, unbounded in the schema: any valid torch seed
        if not low <= value <= high:
            empty = ", or leave it empty for a random seed" if self.name == "seed" else ""
            raise InputError(
                f"{self.name}: {shown(value)} is out of range; use {kind} from {low} to {high}{empty}."
            )
        return int(value) if whole else float(value)


def read_inputs(predict: Path = PREDICT) -> tuple[SchemaInput, ...]:
    """`Predictor.run`'s `Input(...)` declarations, read from the source without running it (as `cog
    build` reads them): one table, written once, where Cog needs it."""
    tree = ast.parse(predict.read_text())
    run = next(
        node for node in ast.walk(tree) if isinstance(node, ast.AsyncFunctionDef) and node.name == "run"
    )
    inputs = []
    for arg, call in zip(run.args.args[1:], run.args.defaults, strict=True):
        given = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
        kind = KINDS[ast.unparse(arg.annotation).split(" | ")[0]]
        bounds = (given["ge"], given["le"]) if "ge" in given else None
        required = "default" not in given
        choices = tuple(given.get("choices", ()))
        inputs.append(
            SchemaInput(arg.arg, kind, given.get("default"), required, choices, bounds, given["description"])
        )
    return tuple(inputs)


INPUTS: Final = read_inputs()
SCHEMA: Final = MappingProxyType({field.name: field for field in INPUTS})
DEFAULTS: Final = MappingProxyType({field.name: field.default for field in INPUTS})
LORA_INPUTS: Final = {"replicate_weights": "lora_scale", "extra_lora": "extra_lora_scale"}  # LoRA -> scale


def refuse_unknown(given: Iterable[str], accepted: Sequence[str] = tuple(SCHEMA)) -> None:
    """Refuse, by name, the first of `given` that is not an accepted input (the published ones)."""
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise InputError(
            f"{unknown[0]}: not an input of this model; leave it out. The inputs are: {', '.join(accepted)}."
        )


def shown(value: Any) -> str:
    """A value as it may appear in an error: short, and never a local path or object repr."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
