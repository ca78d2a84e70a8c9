"""Module params against the module's own manifest (Klipper and ESPHome style: unknown options
are errors, with the file:line of the key and "Did you mean ...?").

A module declares its params in its module.yaml (`params:`, below); the build embeds them in the
.wasm as the custom section `ap.manifest` (JSON), so the module file carries its own schema. The
host reads that section (a few hundred bytes, found by walking section headers: the module's
code is not parsed here) and checks the YAML `params:` of every module against it when the
config is loaded, before any worker starts. The C SDK checks the same keys again in ap_init
(`ap_params_check`), from a header the build generates from the same manifest.

Keys are the flattened names a module sees (`baseline.windows`). A segment `<n>` stands for a
number (`signal.<n>.min` matches `signal.0.min`), `<name>` for a name (`zone.<name>`).
A module without a manifest keeps working: its params go unchecked, with a warning.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from hal.schema import StrictModel

log = logging.getLogger("appliance.config")

SECTION = "ap.manifest"
# In X.simd.wasm: the sha256 (hex) of the X.wasm it was built beside (docs/engines.md).
SIMD_OF_SECTION = "ap.simd_of"
MAX_MANIFEST_BYTES = 64 << 10
KEY = re.compile(r"^(?:[A-Za-z0-9_\-]+|<n>|<name>)(?:\.(?:[A-Za-z0-9_\-]+|<n>|<name>))*$")
ParamType = Literal["number", "integer", "boolean", "string", "choice", "list", "points"]


class ParamSpec(StrictModel):
    """One param a module accepts."""
    type: ParamType = Field(description="number, integer, boolean, string, choice (one of choices), list "
                                        "(of numbers or strings), points (a polygon: [[x, y], ...])")
    description: str = Field(min_length=1, description="what it does, for the docs and error messages")
    default: Any = Field(None, description="what the module uses when the key is absent (docs; the module applies it)")
    min: float | None = Field(None, description="smallest value allowed (numbers)")
    max: float | None = Field(None, description="largest value allowed (numbers)")
    above: float | None = Field(None, description="values must be greater than this (numbers)")
    below: float | None = Field(None, description="values must be less than this (numbers)")
    choices: list[str | int | float] | None = Field(None, description="allowed values (type: choice)")
    unit: str | None = Field(None, description="unit of the value")
    required: bool = Field(False, description="the module refuses to start without it")
    n_max: int | None = Field(None, ge=0, description="the largest number a <n> in the key may stand for")

    @model_validator(mode="after")
    def _consistent(self):
        if self.type == "choice" and not self.choices:
            raise ValueError("type 'choice' needs choices")
        if self.type != "choice" and self.choices:
            raise ValueError("choices belong to type 'choice'")
        if self.type not in ("number", "integer") and any(v is not None for v in (self.min, self.max, self.above, self.below)):
            raise ValueError("min, max and above apply to numbers")
        return self

    def range_text(self) -> str:
        parts = []
        if self.above is not None:
            parts.append(f"> {self.above:g}")
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        if self.below is not None:
            parts.append(f"< {self.below:g}")
        if self.type == "choice":
            parts.append(" | ".join(str(c) for c in self.choices))
        if self.n_max is not None:
            parts.append(f"<n> <= {self.n_max}")
        return ", ".join(parts)


class Manifest(StrictModel):
    """What module.yaml says of a module, as the build embeds it in the .wasm."""
    name: str
    version: str
    description: str = ""
    params: dict[str, ParamSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _keys(self):
        for key in self.params:
            if not KEY.match(key):
                raise ValueError(f"param key {key!r}: dot-separated segments of letters, digits, '_' and '-', "
                                 f"or <n> / <name>")
            if key.split(".")[0] == "host":
                raise ValueError(f"param key {key!r}: host.* params are the appliance's, not the module's")
        return self

    def to_bytes(self) -> bytes:
        """The section's payload: canonical JSON, so a build is reproducible."""
        return json.dumps(self.model_dump(mode="json", exclude_defaults=True), sort_keys=True,
                          separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, payload: bytes) -> "Manifest":
        return cls.model_validate(json.loads(payload))

    def spec_for(self, key: str) -> tuple[str, ParamSpec] | None:
        for pattern, spec in self.params.items():
            if key_matches(pattern, key):
                return pattern, spec
        return None


def key_regex(pattern: str) -> re.Pattern:
    """<n>: digits; <name>: letters, digits, '_', '-' and ':', and '.' too when it ends the key
    (motion's zone names may hold dots)."""
    parts = pattern.split(".")
    out = []
    for i, seg in enumerate(parts):
        if seg == "<n>":
            out.append("[0-9]+")
        elif seg == "<name>":
            out.append(r"[A-Za-z0-9_\-:.]+" if i == len(parts) - 1 else r"[A-Za-z0-9_\-:]+")
        else:
            out.append(re.escape(seg))
    return re.compile(r"\.".join(out))


def key_matches(pattern: str, key: str) -> bool:
    return key_regex(pattern).fullmatch(key) is not None


class ManifestError(Exception):
    """The module's manifest section is there but cannot be read."""


def find_custom_section(wasm: bytes, name: str) -> bytes | None:
    """The payload of the first custom section called `name`, walking only section headers."""
    if wasm[:4] != b"\0asm" or len(wasm) < 8:
        raise ManifestError("not a wasm binary")
    pos, end = 8, len(wasm)

    def uleb() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= end or shift > 28:
                raise ManifestError("malformed section header")
            b = wasm[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7

    while pos < end:
        sid = wasm[pos]
        pos += 1
        size = uleb()
        body = pos
        if body + size > end:
            raise ManifestError("a section runs past the end of the file")
        if sid == 0:
            n = uleb()
            if pos + n <= body + size and wasm[pos:pos + n] == name.encode():
                return wasm[pos + n:body + size]
        pos = body + size
    return None


def simd_binding_problem(simd: bytes, plain: bytes) -> str:
    """Why `simd` is not the SIMD build of `plain` ('' when it is: its ap.simd_of section names
    plain's sha256)."""
    try:
        bound = find_custom_section(simd, SIMD_OF_SECTION)
    except ManifestError as exc:
        return f"it cannot be read as wasm ({exc})"
    if bound is None:
        return f"it names no plain build (no {SIMD_OF_SECTION} section: not built by `make modules`)"
    if bound != hashlib.sha256(plain).hexdigest().encode():
        return "it names another build (built beside another version?)"
    return ""


def read_manifest(path: Path) -> Manifest | None:
    """The manifest embedded in a module file; None when it has none."""
    from appliance.runtime.validate import ModuleRejected, read_module
    try:
        wasm = read_module(path)
    except ModuleRejected as exc:
        raise ManifestError(str(exc)) from None
    return manifest_of(wasm)


def manifest_of(wasm: bytes) -> Manifest | None:
    """The manifest embedded in a module's bytes; None when it has none."""
    payload = find_custom_section(wasm, SECTION)
    if payload is None:
        return None
    if len(payload) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"its manifest is {len(payload)} bytes (at most {MAX_MANIFEST_BYTES})")
    try:
        return Manifest.from_bytes(payload)
    except (ValueError, ValidationError) as exc:
        raise ManifestError(f"its manifest cannot be read: {str(exc).splitlines()[0]}") from None


# ---- checking a module's params ------------------------------------------------------------------

@dataclass(frozen=True)
class ParamProblem:
    path: tuple        # within params: ("baseline", "windos")
    key_mark: bool     # point at the key (unknown name) rather than the value
    message: str


def leaves(params: dict, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, value) of every value that is not a mapping, as module_params_text flattens them."""
    out = []
    for k, v in params.items():
        if isinstance(v, dict):
            out += leaves(v, prefix + (k,))
        else:
            out.append((prefix + (k,), v))
    return out


NUMBER_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _as_number(v: Any) -> float | None:
    """v as the module will read it (ap_parse_f64): a YAML number, or a text in the C grammar
    (YAML 1.1 reads 1e-3 as a string); None if it is neither or not finite."""
    if isinstance(v, bool):
        return None
    if isinstance(v, str) and NUMBER_TEXT.match(v.strip()):
        v = v.strip()
    elif not isinstance(v, (int, float)):
        return None
    try:
        x = float(v)
    except (OverflowError, ValueError):   # an int beyond any double
        return None
    return x if math.isfinite(x) else None


def _number(v: Any) -> bool:
    return _as_number(v) is not None


def _text(v: Any) -> str:
    """A scalar as the module receives it (params_text)."""
    return ("1" if v else "0") if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v)


def _check_value(key: str, spec: ParamSpec, v: Any) -> str | None:
    t = spec.type
    if t in ("number", "integer"):
        x = _as_number(v)
        if x is None:
            return f"{_short(v)} is invalid: {key} is a {'whole number' if t == 'integer' else 'number'}"
        if t == "integer" and x != int(x):
            return f"{_short(v)} is invalid: {key} is a whole number"
        if spec.min is not None and x < spec.min or spec.max is not None and x > spec.max \
                or spec.above is not None and x <= spec.above or spec.below is not None and x >= spec.below:
            return f"{_short(v)} is invalid: {key} must be {spec.range_text()}"
        return None
    if t == "boolean":
        return None if isinstance(v, bool) or v in (0, 1) else f"{_short(v)} is invalid: {key} is true or false"
    if t == "string":
        ok = isinstance(v, (str, int, float)) and not isinstance(v, bool) and _text(v) != ""
        return None if ok else f"{_short(v)} is invalid: {key} is a text"
    if t == "choice":
        ok = isinstance(v, (str, int, float)) and not isinstance(v, bool) and _text(v) in {str(c) for c in spec.choices}
        return None if ok else f"{_short(v)} is invalid: {key} is one of {', '.join(str(c) for c in spec.choices)}"
    if t == "list":
        scalar = lambda x: isinstance(x, (int, float, str)) and not isinstance(x, bool)   # noqa: E731
        ok = isinstance(v, list) and v and all(scalar(x) for x in v) or scalar(v)
        return None if ok else f"{_short(v)} is invalid: {key} is a list of values"
    if t == "points":
        ok = isinstance(v, list) and len(v) >= 3 and all(
            isinstance(p, list) and len(p) == 2 and all(_number(c) for c in p) for p in v)
        return None if ok else f"{_short(v)} is invalid: {key} is a polygon, at least 3 points [x, y]"
    return None


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggestion(key: str, manifest: Manifest) -> str:
    """'Did you mean ...?' from the manifest's keys, placeholders filled from the user's key."""
    have = key.split(".")
    candidates = []
    for pattern in manifest.params:
        want = pattern.split(".")
        if len(want) == len(have):
            candidates.append(".".join(h if w in ("<n>", "<name>") else w for w, h in zip(want, have)))
        else:
            candidates.append(pattern)
    near = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if near:
        return f" Did you mean {near[0]!r}?"
    shown = sorted(manifest.params)
    return f" Its params: {', '.join(shown[:24])}{', ...' if len(shown) > 24 else ''}"


def check(params: dict, manifest: Manifest) -> list[ParamProblem]:
    """Every problem of a module's YAML params against its manifest."""
    problems = []
    seen = set()
    for path, value in leaves(params):
        key = ".".join(str(p) for p in path)
        found = manifest.spec_for(key)
        if found is None:
            full = f" ({key})" if len(path) > 1 else ""
            problems.append(ParamProblem(path, True, f"{str(path[-1])!r} is not a param of module "
                                         f"{manifest.name}{full}.{_suggestion(key, manifest)}"))
            continue
        pattern, spec = found
        seen.add(pattern)
        numbers = [int(h) for w, h in zip(pattern.split("."), key.split(".")) if w == "<n>"]
        if spec.n_max is not None and any(n > spec.n_max for n in numbers):
            problems.append(ParamProblem(path, True, f"{key}: {max(numbers)} is beyond {spec.n_max}, the largest "
                                         f"number module {manifest.name} takes there"))
            continue
        complaint = _check_value(key, spec, value)
        if complaint:
            problems.append(ParamProblem(path, False, f"{complaint} ({spec.description})"))
    for pattern, spec in manifest.params.items():
        if spec.required and pattern not in seen:
            problems.append(ParamProblem((), True, f"required param {pattern!r} of module {manifest.name} is "
                                         f"missing ({spec.description})"))
    return problems


def table(manifest: Manifest) -> str:
    """The params as a markdown table, for the module's docs page."""
    rows = ["| param | type | default | range | unit | meaning |", "|---|---|---|---|---|---|"]
    for key, spec in manifest.params.items():
        default = "required" if spec.required else "–" if spec.default is None else f"`{spec.default}`"
        rows.append(f"| `{key}` | {spec.type} | {default} | {_cell(spec.range_text() or '–')} | "
                    f"{_cell(spec.unit or '–')} | {_cell(spec.description)} |")
    return "\n".join(rows)


def _cell(text: str) -> str:
    """A markdown table cell: a "|" in it (choices are joined with one) would start another cell."""
    return text.replace("|", "\\|")
