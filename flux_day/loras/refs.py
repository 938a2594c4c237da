"""What a `replicate_weights` / `extra_lora` value points at, and how to show it without leaking.
Parsing is pure: which host serves each service is a setting applied when fetching."""

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
SERVICE_HOSTS = {"replicate.com": "replicate", "huggingface.co": "huggingface", "civitai.com": "civitai"}
SERVICE_HOSTS |= {f"www.{host}": kind for host, kind in SERVICE_HOSTS.items()} | {"hf.co": "huggingface"}
FORMS = (
    "a Replicate model (owner/model or owner/model/version), huggingface.co/owner/repo, "
    "civitai.com/models/<id>, an http(s) URL of a .safetensors or .tar file, or a data: URI"
)
DEFAULT_LORA_INPUT = "COG_WEIGHTS"  # how errors name the operator's default LoRA


@dataclass(frozen=True)
class LoraRef:
    """A parsed reference: `location` as given, a service reference's parts (`path`: a file in a repo).
    A `local` one (a path on the server) comes only from the operator, never from a request."""

    kind: Literal["url", "data", "replicate", "huggingface", "civitai", "local"]
    location: str
    owner: str = ""
    name: str = ""
    version: str = ""
    path: str = ""

    @property
    def shown(self) -> str:
        """As it may appear in logs and errors: no query string, no credentials, short."""
        if self.kind == "replicate":
            return "/".join(part for part in (self.owner, self.name, self.version) if part)
        if self.kind == "huggingface":
            where = f"/tree/{self.version}" * bool(self.version)
            where = f"/blob/{self.version}/{self.path}" if self.path else where
            return f"huggingface.co/{self.owner}/{self.name}{where}"
        if self.kind == "civitai":
            return f"civitai.com/models/{self.name}" + f"?modelVersionId={self.version}" * bool(self.version)
        return shown_source(self.location)

    @property
    def identity(self) -> str:
        """What names one file for caching: the whole reference (a URL's query may select the file)."""
        if self.kind in {"url", "data", "local"}:
            return f"{self.kind}:{self.location}"
        return f"{self.kind}:{self.owner}/{self.name}/{self.version}/{self.path}"

    @cached_property
    def identity_digest(self) -> str:
        """`identity` hashed once (a data: URI may be megabytes): the key of parsed LoRAs in memory."""
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
        host = f"{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
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
    service = SERVICE_HOSTS.get(host)
    if parts is not None and parts.scheme.lower() in {"http", "https"} and host:
        if service == "replicate":
            return _replicate(parts.path.strip("/"), source)
        if service == "huggingface":
            return _hugging_face(parts.path.strip("/"), source)
        if service == "civitai" and parts.path.startswith("/models/"):
            model_id = parts.path.removeprefix("/models/").split("/")[0]
            version = urllib.parse.parse_qs(parts.query).get("modelVersionId", [""])[0]
            if model_id.isdigit() and (version.isdigit() or not version):
                return LoraRef("civitai", source, name=model_id, version=version)
            raise _unknown(source)
        if "://" in source:
            return LoraRef("url", source)
    if "." not in source.split("/")[0] and _REPLICATE_NAME.match(source):
        return _replicate(source, source)
    if parts is not None and "://" not in source and "." in host and parts.path.strip("/"):
        return LoraRef("url", text)  # a URL pasted without https://
    raise _unknown(source)


def _unknown(source: str) -> LoraError:
    return LoraError(f"{shown_source(source)} is not a LoRA reference; give {FORMS}.")


def _replicate(path: str, source: str) -> LoraRef:
    if (match := _REPLICATE_NAME.match(path)) is None:
        raise _unknown(source)
    return LoraRef("replicate", source, match["owner"], match["model"], match["version"] or "")


def _hugging_face(path: str, source: str) -> LoraRef:
    segments = path.split("/")
    if len(segments) < 2 or not all(re.fullmatch(_NAME, s) for s in segments[:2]):
        raise _unknown(source)
    # Links copied from a browser percent-encode the revision and file ("style%20one.safetensors").
    owner, repo, *rest = segments[:2] + [urllib.parse.unquote(segment) for segment in segments[2:]]
    if rest and rest[0] in {"blob", "resolve"} and len(rest) >= 3:
        return LoraRef("huggingface", source, owner, repo, rest[1], "/".join(rest[2:]))
    if not rest or (rest[0] == "tree" and len(rest) >= 2):
        return LoraRef("huggingface", source, owner, repo, rest[1] if rest else "")
    raise _unknown(source)


def decode_data_uri(ref: LoraRef, max_bytes: int) -> bytes:
    """The bytes of a `data:` URI (base64 or percent-encoded), refusing anything over `max_bytes`."""
    match = _DATA_URI.match(ref.location)
    if match is None:
        raise LoraError("the data: URI is malformed; write it as data:;base64,<bytes>.")
    payload = match["payload"]
    is_base64 = any(p.strip().lower() == "base64" for p in match["params"].split(";"))
    too_big = LoraError(
        f"the data: URI holds more than {max_bytes} bytes, the LoRA size limit "
        "(FLUX_DAY_MAX_LORA_BYTES); give a URL of the file instead."
    )
    # base64 is 4 characters for every 3 bytes: refuse before decoding a payload that cannot fit.
    if (len(payload) * 3 // 4 if is_base64 else len(payload) // 3) > max_bytes:
        raise too_big
    try:
        if is_base64:
            data = base64.b64decode(urllib.parse.unquote("".join(payload.split())), validate=True)
        else:
            data = urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise LoraError("the data: URI is not valid base64.") from None
    if len(data) > max_bytes:
        raise too_big
    return data


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA a request asks for, parsed once at the door; `input_name` is named in its errors."""

    input_name: str
    ref: LoraRef
    scale: float

    @classmethod
    def parse(cls, input_name: str, source: str, scale: float) -> LoraRequest:
        with LoraError.for_input(input_name):
            return cls(input_name, parse_ref(source), scale)

    @classmethod
    def operator_default(cls, source: str, scale: float) -> LoraRequest:
        """The operator's default LoRA (`COG_WEIGHTS` or `setup(weights=...)`): any reference a request
        may give, or else a path on the server (a file, or a folder holding one)."""
        with LoraError.for_input(DEFAULT_LORA_INPUT):
            remote = source.startswith(("data:", "http:", "https:"))
            return cls(DEFAULT_LORA_INPUT, parse_ref(source) if remote else LoraRef("local", source), scale)
