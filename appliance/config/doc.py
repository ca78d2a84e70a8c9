"""Render docs/configuration.md from the config models, so the reference never drifts.

    python -m appliance.config.doc > docs/configuration.md     (a test checks it is current)
"""
from __future__ import annotations

import types
import typing
from typing import Any, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from appliance.config.schema import AppConfig
from hal.registry import SOURCE_TYPES

INTRO = """\
# Configuration reference

The appliance reads one YAML file (default: `configs/appliance.yaml`). Relative paths in it are
relative to the file. Unknown keys are errors, as are wrong types and out-of-range values; every
error names file:line:column, the key path, the value and the reason, with "Did you mean …?"
for a near-miss key. Check a file without starting anything: `appliance validate FILE`.

Names of sources and modules are lower-case letters, digits and `_`, starting with a letter
(they become metric labels). This page is generated from the models
(`python -m appliance.config.doc`).
"""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if all(isinstance(a, type) and issubclass(a, BaseModel) for a in args):
            return "mapping"
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping name → {_type_name(typing.get_args(tp)[1])}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "mapping"
    return {"int": "integer", "float": "number", "str": "string", "bool": "boolean",
            "Path": "path", "PosixPath": "path"}.get(getattr(tp, "__name__", str(tp)), getattr(tp, "__name__", str(tp)))


def _constraints(field) -> str:
    parts = []
    for m in field.metadata:
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "min length")):
            v = getattr(m, attr, None)
            if v is not None:
                parts.append(f"{sym} {v}")
    return ", ".join(parts)


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    d = field.default
    if d is PydanticUndefined or d is None:
        return "—"
    if isinstance(d, BaseModel):
        return "see below"
    return f"`{d}`" if not isinstance(d, (dict, list)) or d else "empty"


def _nested_models(tp: Any) -> list[type[BaseModel]]:
    out = []
    for arg in (typing.get_args(tp) or ()):
        out += _nested_models(arg)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        out.append(tp)
    return out


def _section(title: str, model: type[BaseModel], seen: set, out: list[str]) -> None:
    out.append(f"\n## {title}\n")
    if model.__doc__ and model.__module__ != "appliance.config.schema":
        out.append(model.__doc__.strip().splitlines()[0] + "\n")
    out.append("| option | type | default | constraints | meaning |")
    out.append("|---|---|---|---|---|")
    nested = []
    for name, field in model.model_fields.items():
        out.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {_constraints(field)} | "
                   f"{(field.description or '').replace('|', '/')} |")
        for sub in _nested_models(field.annotation):
            if sub not in seen and sub not in [m for _, m in SOURCE_TYPES.values()]:
                nested.append((f"{title} → {name}", sub))
    seen.add(model)
    for sub_title, sub in nested:
        if sub not in seen:
            _section(sub_title, sub, seen, out)


def render() -> str:
    out = [INTRO]
    seen: set = set()
    for name, field in AppConfig.model_fields.items():
        if name in ("sources", "modules"):
            continue
        _section(f"`{name}:`", field.annotation, seen, out)
    modules_tp = typing.get_args(AppConfig.model_fields["modules"].annotation)[1]
    _section("`modules: NAME:` (one per module)", modules_tp, seen, out)
    for type_name, (_, model) in sorted(SOURCE_TYPES.items()):
        _section(f"`sources: NAME:` with `type: {type_name}`", model, seen, out)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
