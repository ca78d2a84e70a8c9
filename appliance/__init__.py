"""Industrial-IoT gateway appliance: acquisition, WebAssembly analytics modules, reporting."""
__version__ = "0.1.0"
