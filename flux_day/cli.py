"""Command line: `python -m flux_day generate "prompt" [options]` runs a generation outside Cog.

Options: the published schema's inputs (checked before torch is imported), then the machine's own. Unlike
the server (which must never read its disk) it takes local LoRA files and folders, and any number of LoRAs.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from flux_day.config import Settings
from flux_day.errors import FluxDayError, InputError, WeightsError
from flux_day.loras.refs import LoraRef, LoraRequest
from flux_day.outputs import save_image
from flux_day.request import GenerationRequest
from flux_day.schema import DEFAULTS, INPUTS, LORA_INPUTS, SCHEMA, SchemaInput

log = logging.getLogger("flux_day")

PROG = "python -m flux_day generate"
LOCAL_LORA_HELP = " Here also a local .safetensors file, or a folder holding one."
DOWNLOAD_HELP = (
    "download the base weights when the weights root lacks them (about 60 GB from the Hugging Face Hub; "
    "FLUX.1 [dev] is gated: HF_TOKEN must be of an account that accepted its licence)"
)
LORA_HELP = (
    "one more LoRA, in any form --replicate-weights takes, at SCALE (default 1, from -1 to 3); give it as "
    "often as you like"
)
PATH_STARTS = ("/", "./", "../", "~", "file://")
INTERRUPTED_EXIT = 130  # the shell's own status for a command stopped by Ctrl-C


def _schema_help(field: SchemaInput) -> str:
    """The input's description, then what it takes and its default, as `--help` shows it."""
    if field.choices:
        takes = "one of " + ", ".join(field.choices)
    elif field.bounds is not None:
        low, high = field.bounds
        takes = f"{'an integer' if field.kind == 'integer' else 'a number'} from {low:g} to {high:g}"
    else:
        takes = {"file": "an image file", "integer": "an integer", "boolean": "a flag"}.get(field.kind, "")
    default = "" if field.default is None else f"default: {field.default}"
    shown = "; ".join(part for part in (takes, default) if part)
    described = f"{field.description.rstrip('.')}. ({shown})" if shown else field.description
    return described + LOCAL_LORA_HELP * (field.name in LORA_INPUTS)


def _value_type(field: SchemaInput) -> Any:
    """The argparse type of a schema input: a failed conversion reads like every other input error."""
    if field.kind not in {"integer", "number"}:
        return Path if field.kind == "file" else str
    convert, kind = (int, "an integer") if field.kind == "integer" else (float, "a number")

    def value(text: str) -> int | float:
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}; give {kind}.") from None

    value.__name__ = kind  # argparse names the type in some messages
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, suggesting the closest option for a misspelt one (as Python 3.14's suggest_on_error)."""

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            options = [option for action in self._actions for option in action.option_strings]
            close = difflib.get_close_matches(unknown[0].split("=")[0], options, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; see {PROG} --help."
            self.error(f"{unknown[0]}: not an option{hint}")
        return parsed


def parser() -> argparse.ArgumentParser:
    """The `generate` command's parser: the schema's inputs, then the machine's own options."""
    gen = _Parser(
        prog=PROG,
        usage=f"{PROG} PROMPT [options]  (all options: --help)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    schema = gen.add_argument_group("inputs (the model's published schema)")
    for field in INPUTS:
        flag = field.name if field.required else f"--{field.name.replace('_', '-')}"
        options: dict[str, Any] = {"action": "store_true"} if field.kind == "boolean" else {}
        if not field.required and field.kind != "boolean":
            options = dict(type=_value_type(field), choices=field.choices or None, metavar=field.name.upper())
        schema.add_argument(flag, help=_schema_help(field), **options)
    own = gen.add_argument_group("this machine")
    own.add_argument("--weights", type=Path, help="weights root (default: FLUX_DAY_WEIGHTS, else ./weights)")
    own.add_argument("--download", action="store_true", help=DOWNLOAD_HELP)
    own.add_argument("--out", type=Path, default="outputs", help="folder for the images (default: outputs)")
    own.add_argument("--lora", action="append", default=[], metavar="REF[:SCALE]", help=LORA_HELP)
    return gen


def ignored_inputs(inputs: dict[str, Any]) -> list[str]:
    """A note for each input given that this request will not use, so nothing is ignored in silence."""
    notes = []
    sides = [name for name in ("width", "height") if name in inputs]
    given = [name for name in ("aspect_ratio", *sides, "megapixels") if name in inputs]
    if "image" in inputs and given:
        notes.append(f"{', '.join(given)}: ignored with --image; the image's own size is used.")
    elif sides and inputs.get("aspect_ratio") != "custom":
        them = "them" if len(sides) > 1 else "it"
        notes.append(f"{' and '.join(sides)}: ignored unless --aspect-ratio custom; add that to use {them}.")
    if "prompt_strength" in inputs and "image" not in inputs:
        notes.append("prompt_strength: ignored without --image; it applies to image-to-image only.")
    if "output_quality" in inputs and inputs.get("output_format") == "png":
        notes.append("output_quality: ignored for png, which is lossless.")
    return notes


def local_path(name: str, text: str) -> Path | None:
    """The local file or folder `text` names, or None for a reference; an existing path wins over a
    Replicate name spelt the same."""
    path = Path(unquote(urlsplit(text).path)) if text.startswith("file://") else Path(text).expanduser()
    if path.exists():
        return path.resolve()
    if text.startswith(PATH_STARTS):
        raise InputError(
            f"{name}: {text!r} is no such file or folder; give the path of a .safetensors LoRA or a "
            "folder holding one."
        )
    return None


def lora_option(text: str) -> LoraRequest:
    """One `--lora REF[:SCALE]`: SCALE follows the last colon when it is a number; 1 when absent."""
    ref, colon, tail = text.rpartition(":")
    scale = 1.0
    if colon and ref:
        with contextlib.suppress(ValueError):  # otherwise not a scale: a colon of the reference itself
            scale, text = float(tail), ref
    low, high = SCHEMA["lora_scale"].bounds  # type: ignore[misc]
    if not low <= scale <= high:
        raise InputError(f"--lora: scale {tail} is out of range; use a number from {low:g} to {high:g}.")
    return lora_request("--lora", text, scale)


def lora_request(name: str, text: str, scale: float) -> LoraRequest:
    """A LoRA given as input `name`: a local path, or any reference a request may give."""
    if (path := local_path(name, text.strip())) is None:
        return LoraRequest.parse(name, text, scale)
    return LoraRequest(name, LoraRef("local", str(path)), scale)


def request_with_loras(inputs: dict[str, Any], options: Sequence[str]) -> GenerationRequest:
    """The checked request with its LoRAs: the schema's two in their order (local paths too, which the
    schema's checks would refuse), then every `--lora`."""
    local = {}
    for name, scale_name in LORA_INPUTS.items():
        text = inputs.get(name)
        if text and local_path(name, text.strip()) is not None:
            scale = SCHEMA[scale_name].check(inputs.get(scale_name, DEFAULTS[scale_name]))
            local[name] = lora_request(name, text, scale)
    extra = tuple(lora_option(option) for option in options)
    request = GenerationRequest.from_inputs(**inputs | dict.fromkeys(local))
    named = {lora.input_name: lora for lora in (*request.loras, *local.values())}
    return replace(request, loras=(*(named[name] for name in LORA_INPUTS if name in named), *extra))


def ready_settings(args: argparse.Namespace) -> Settings:
    """Settings with `--weights`; base weights present, or a download agreed to."""
    from flux_day.weights.download import download_notice, missing_folders

    # --weights stands for FLUX_DAY_WEIGHTS, so what defaults under it (the LoRA cache) follows it.
    given = {"FLUX_DAY_WEIGHTS": str(args.weights)} if args.weights is not None else {}
    settings = Settings.from_env(os.environ | given)
    missing = missing_folders(settings.weights)
    if missing and not args.download:
        raise WeightsError(
            f"{download_notice(settings.weights, missing)} To fetch them, add --download to this "
            f"command or run `python scripts/download_weights.py --weights {settings.weights}`; "
            f"`python scripts/make_tiny_weights.py {settings.weights}` writes random test weights instead."
        )
    return settings


def output_path(out: Path, request: GenerationRequest, seed: int) -> Path:
    """A new file for one image, named for what made it (model, mode, go_fast, seed); never an existing
    one: runs that differ in anything else get `-2`, `-3`, ..."""
    fast = "-fast" if request.fp8 else ""
    stem = f"{request.model}-{request.mode}{fast}-{seed}"
    for attempt in range(1, 10_000):
        path = out / f"{stem}{'' if attempt == 1 else f'-{attempt}'}.{request.output_format}"
        with contextlib.suppress(FileExistsError):
            path.open("xb").close()  # claimed: a run beside this one picks another name
            return path
    raise InputError(f"--out: {str(out)!r} already holds 10000 images named {stem}; give another folder.")


def generate(args: argparse.Namespace) -> list[Path]:
    """Run one generation; return the written files. All a user can get wrong is checked before torch."""
    out = args.out  # created and proven writable before any work: a long run never ends in a failed write
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as error:
        raise InputError(
            f"--out: {str(out)!r} cannot be written ({error.strerror or error}); give a folder you can write."
        ) from None
    inputs = {field.name: value for field in INPUTS if (value := getattr(args, field.name)) is not None}
    for note in ignored_inputs(inputs):
        log.warning("%s", note)
    request = request_with_loras(inputs, args.lora)
    settings = ready_settings(args)
    from flux_day.engine import Engine

    images = Engine(settings).generate(request).images
    written: list[Path] = []
    for seed, image in zip(request.seeds, images, strict=True):
        path = output_path(out, request, seed)
        try:
            written.append(save_image(image, path, request.output_format, request.output_quality))
        except BaseException:
            path.unlink(missing_ok=True)  # no half-written image left behind (Ctrl-C, full disk)
            raise
    return written


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes print one sentence and exit 2, Ctrl-C one line and 130."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "generate":  # `python -m flux_day` alone: one command for now
        top = argparse.ArgumentParser(prog="python -m flux_day", description=__doc__)
        commands = top.add_subparsers(dest="command", required=True, metavar="generate")
        commands.add_parser("generate", help=f"generate images and write them to --out (see {PROG} --help)")
        top.parse_args(argv)  # prints help or the usage error, and exits
    args = parser().parse_args(argv[1:])
    try:
        for path in generate(args):
            print(path)
    except FluxDayError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no image of this run is left half-written.", file=sys.stderr)
        return INTERRUPTED_EXIT
    return 0
