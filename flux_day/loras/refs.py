"""What a `replicate_weights` / `extra_lora` value points at, and how to show it without leaking.

The forms the schema promises: a Replicate model (`owner/model`, `owner/model/version`, optionally
behind `replicate.com/`), a Hugging Face repo or file (`huggingface.co/owner/repo[/blob|resolve/rev/
file]`), a CivitAI model (`civitai.com/models/<id>[/<name>][?modelVersionId=<v>]`), any http(s) URL,
and a `data:` URI; the operator's default LoRA (`COG_WEIGHTS`) may also be a local file. Parsing is
pure: which host serves each service is a setting applied when fetching. `LoraRequest` is one LoRA a
request asks for, parsed once at the door (`GenerationRequest`) and carried to the manager.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import urllib.parse
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from flux_day.errors import LoraError

_DATA_URI = re.compile(r"^data:(?P<mediatype>[^,;]*)(?P<params>(;[^,;]*)*?),(?P<payload>.*)$", re.DOTALL)
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_REPLICATE_NAME = re.compile(
    rf"^(?P<owner>{_NAME})/(?P<model>{_NAME})(?:/(?:versions/)?(?P<version>[A-Za-z0-9]+))?/?$"
)
REPLICATE_HOSTS = frozenset({"replicate.com", "www.replicate.com"})
HUGGING_FACE_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})
CIVITAI_HOSTS = frozenset({"civitai.com", "www.civitai.com"})
FORMS = (
    "a Replicate model (owner/model or owner/model/version), huggingface.co/owner/repo, "
    "civitai.com/models/<id>, an http(s) URL of a .safetensors or .tar file, or a data: URI"
)

DEFAULT_LORA_INPUT = "COG_WEIGHTS"  # how errors name the operator's default LoRA
OPERATOR_REFERENCE_SCHEMES = ("data:", "http:", "https:")  # any other COG_WEIGHTS is a local path

Kind = Literal["url", "data", "replicate", "huggingface", "civitai", "local"]


@dataclass(frozen=True)
class LoraRef:
    """A parsed reference. `location` is what the user gave (a URL or data URI for those kinds);
    `owner`/`name`/`version`/`path` hold the parts of a service reference (`path`: a file in a repo).
    A `local` reference (a path on the server) comes only from the operator, never from a request."""

    kind: Kind
    location: str
    owner: str = ""
    name: str = ""
    version: str = ""
    path: str = ""

    @property
    def shown(self) -> str:
        """The reference as it may appear in logs and errors: no query string, no credentials, short."""
        if self.kind == "replicate":
            return "/".join(part for part in (self.owner, self.name, self.version) if part)
        if self.kind == "huggingface":
            suffix = f"/blob/{self.version}/{self.path}" if self.path else ""
            suffix = suffix or (f"/tree/{self.version}" if self.version else "")
            return f"huggingface.co/{self.owner}/{self.name}{suffix}"
        if self.kind == "civitai":
            version = f"?modelVersionId={self.version}" if self.version else ""
            return f"civitai.com/models/{self.name}{version}"
        return shown_source(self.location)

    @property
    def identity(self) -> str:
        """What names the same file for caching: the whole reference (a URL's query may select it)."""
        if self.kind in {"url", "data", "local"}:
            return f"{self.kind}:{self.location}"
        return f"{self.kind}:{self.owner}/{self.name}/{self.version}/{self.path}"

    @cached_property
    def identity_digest(self) -> str:
        """`identity` hashed, once per parsed reference: the key of the parsed-LoRA memory, so two
        spellings of one file (`o/m`, `replicate.com/o/m`) are parsed once, and a data: URI of
        megabytes is hashed once although a request asks for its LoRAs twice (CLIP's, then the
        transformer's part)."""
        return hashlib.sha256(self.identity.encode()).hexdigest()


def shown_source(source: str) -> str:
    """`source` made safe to print: data URIs by size, URLs without user, password, query or fragment."""
    if source.startswith("data:"):
        return f"a data: URI of {len(source)} characters"
    try:
        parts = urllib.parse.urlsplit(source)
    except ValueError:
        return repr(source[:40])
    if parts.scheme and parts.netloc:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        path = parts.path if len(parts.path) <= 80 else parts.path[:77] + "..."
        return f"{parts.scheme}://{host}{path}"
    return repr(source if len(source) <= 40 else source[:37] + "...")


def parse_ref(source: str) -> LoraRef:
    """Classify `source`; refuse a shape none of the supported forms has, listing the forms."""
    source = source.strip()
    if source.startswith("data:"):
        return LoraRef("data", source)
    text = source if "://" in source else f"https://{source}"
    try:
        parts = urllib.parse.urlsplit(text)
        host = (parts.hostname or "").lower()
    except ValueError:
        parts, host = None, ""
    if parts is not None and parts.scheme.lower() in {"http", "https"} and host:
        if host in REPLICATE_HOSTS:
            return _replicate(parts.path.strip("/"), source)
        if host in HUGGING_FACE_HOSTS:
            return _hugging_face(parts.path.strip("/"), source)
        if host in CIVITAI_HOSTS and parts.path.startswith("/models/"):
            return _civitai(parts, source)
        if "://" in source:
            return LoraRef("url", source)
    match = _REPLICATE_NAME.match(source)
    if match and "." not in match["owner"]:
        return LoraRef("replicate", source, match["owner"], match["model"], match["version"] or "")
    if parts is not None and "://" not in source and "." in host and parts.path.strip("/"):
        return LoraRef("url", text)  # a URL pasted without https://
    raise _unknown(source)


def parse_operator_ref(source: str) -> LoraRef:
    """The operator's default LoRA: any reference a request may give, or else a path on the server
    (a file, or a folder holding one, as `cog` passes weights), which no request input may name."""
    if source.startswith(OPERATOR_REFERENCE_SCHEMES):
        return parse_ref(source)
    return LoraRef("local", source)


def _unknown(source: str) -> LoraError:
    return LoraError(f"{shown_source(source)} is not a LoRA reference; give {FORMS}.")


def _replicate(path: str, source: str) -> LoraRef:
    match = _REPLICATE_NAME.match(path)
    if match is None:
        raise _unknown(source)
    return LoraRef("replicate", source, match["owner"], match["model"], match["version"] or "")


def _hugging_face(path: str, source: str) -> LoraRef:
    segments = path.split("/")
    if len(segments) < 2 or not all(re.fullmatch(_NAME, s) for s in segments[:2]):
        raise _unknown(source)
    owner, repo, rest = segments[0], segments[1], segments[2:]
    if not rest:
        return LoraRef("huggingface", source, owner, repo)
    # Links copied from a browser percent-encode the revision and file ("style%20one.safetensors").
    rest = [urllib.parse.unquote(segment) for segment in rest]
    if rest[0] in {"blob", "resolve"} and len(rest) >= 3:
        return LoraRef("huggingface", source, owner, repo, rest[1], "/".join(rest[2:]))
    if rest[0] == "tree" and len(rest) >= 2:
        return LoraRef("huggingface", source, owner, repo, rest[1])
    raise _unknown(source)


def _civitai(parts: urllib.parse.SplitResult, source: str) -> LoraRef:
    model_id = parts.path.removeprefix("/models/").split("/")[0]
    version = urllib.parse.parse_qs(parts.query).get("modelVersionId", [""])[0]
    if not model_id.isdigit() or (version and not version.isdigit()):
        raise _unknown(source)
    return LoraRef("civitai", source, name=model_id, version=version)


def decode_data_uri(ref: LoraRef, max_bytes: int) -> bytes:
    """The bytes of a `data:` URI (base64 or percent-encoded), refusing anything over `max_bytes`."""
    match = _DATA_URI.match(ref.location)
    if match is None:
        raise LoraError("the data: URI is malformed; write it as data:;base64,<bytes>.")
    payload = match["payload"]
    is_base64 = any(p.strip().lower() == "base64" for p in match["params"].split(";"))
    # base64 is 4 characters for every 3 bytes: refuse before decoding a payload that cannot fit.
    if (len(payload) * 3 // 4 if is_base64 else len(payload) // 3) > max_bytes:
        raise _too_big(max_bytes)
    if is_base64:
        payload = urllib.parse.unquote("".join(payload.split()))
    try:
        data = (
            base64.b64decode(payload, validate=True) if is_base64 else urllib.parse.unquote_to_bytes(payload)
        )
    except (binascii.Error, ValueError):
        raise LoraError("the data: URI is not valid base64.") from None
    if len(data) > max_bytes:
        raise _too_big(max_bytes)
    return data


def _too_big(max_bytes: int) -> LoraError:
    return LoraError(
        f"the data: URI holds more than {max_bytes} bytes, the LoRA size limit "
        "(FLUX_DAY_MAX_LORA_BYTES); give a URL of the file instead."
    )


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA to fuse: the input it came from (named in its errors), its parsed reference, its scale."""

    input_name: str
    ref: LoraRef
    scale: float

    @classmethod
    def parse(cls, input_name: str, source: str, scale: float) -> LoraRequest:
        """The LoRA `source` given as `input_name`; a reference of no supported form is refused, named."""
        with LoraError.for_input(input_name):
            return cls(input_name, parse_ref(source), scale)

    @classmethod
    def operator_default(cls, source: str, scale: float) -> LoraRequest:
        """The operator's default LoRA (`COG_WEIGHTS` or `setup(weights=...)`) at `scale`."""
        with LoraError.for_input(DEFAULT_LORA_INPUT):
            return cls(DEFAULT_LORA_INPUT, parse_operator_ref(source), scale)
