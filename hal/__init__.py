"""Hardware abstraction layer: sources of sensor data, opened from YAML through a registry."""
from hal.source import Block, Health, Source, SourceInfo
from hal.registry import SOURCE_TYPES, open_source, register_source

__all__ = ["Block", "Health", "Source", "SourceInfo", "SOURCE_TYPES", "open_source", "register_source"]
