"""Strict config models shared by every component (ESPHome-style: each driver owns its schema)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, ValidationInfo
from pydantic.functional_validators import AfterValidator, WrapValidator


class StrictModel(BaseModel):
    """Unknown keys are errors; values are checked, never coerced from the wrong type."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True, validate_default=True,
                              allow_inf_nan=False)


def resolve_config_path(value: Any, handler, info: ValidationInfo) -> Path:
    # Relative paths mean "relative to the YAML file that says them", as in Prometheus configs.
    path = Path(handler(value)).expanduser()
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(os.path.normpath(Path(base) / path))
    return path


def path_exists(path: Path) -> bool:
    """Whether path exists; a path the system cannot even look up (a name longer than the file
    system allows, a component that is not a directory) is a config error, not a crash."""
    try:
        return path.exists()
    except OSError as exc:
        raise ValueError(f"cannot use {str(path)[:120]}{'...' if len(str(path)) > 120 else ''}: "
                         f"{exc.strerror or exc}") from None


def _must_exist(path: Path) -> Path:
    if not path_exists(path):
        raise ValueError(f"file not found: {path}")
    return path


def _unique_names(names: list[str]) -> list[str]:
    if any(not n for n in names):
        raise ValueError("names must not be empty")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"names must be unique; repeated: {', '.join(dupes)}")
    return names


# Channel or axis names: non-empty and unique (they become labels and feature names).
ChannelNames = Annotated[list[str], AfterValidator(_unique_names)]

# A path relative to the config file; ExistingFile also requires it to exist.
ConfigPath = Annotated[Path, WrapValidator(resolve_config_path)]
ExistingFile = Annotated[Path, WrapValidator(resolve_config_path), AfterValidator(_must_exist)]
