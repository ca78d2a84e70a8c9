"""Module runtime: wasm backends, the per-module worker process and its supervisor-side host."""
