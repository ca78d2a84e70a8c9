"""Source plugins by type name: a YAML section's `type:` picks the class, never an if/elif chain."""
from __future__ import annotations

from typing import Callable

from hal.source import Source

# type name -> (Source subclass, its pydantic config model)
SOURCE_TYPES: dict[str, tuple[type[Source], type]] = {}


def register_source(type_name: str, config_model: type) -> Callable[[type[Source]], type[Source]]:
    def decorate(cls: type[Source]) -> type[Source]:
        if type_name in SOURCE_TYPES:
            raise RuntimeError(f"source type {type_name!r} registered twice")
        cls.type_name = type_name
        SOURCE_TYPES[type_name] = (cls, config_model)
        return cls
    return decorate


def load_builtin_sources() -> None:
    # Importing the modules runs their @register_source decorators.
    import hal.sources.sim_vibration  # noqa: F401
    import hal.sources.replay  # noqa: F401
    import hal.sources.iio  # noqa: F401
    import hal.sources.i2c_accel  # noqa: F401
    import hal.sources.modbus_rtu  # noqa: F401
    import hal.sources.nmea  # noqa: F401
    import hal.sources.camera  # noqa: F401


def open_source(name: str, config) -> Source:
    """Build (not yet open) the source that a validated config section describes."""
    load_builtin_sources()
    cls, _ = SOURCE_TYPES[config.type]
    return cls(name, config)
