"""`make fuzz-modules`: mutated copies of the shipped modules through the real worker path.

Each mutant goes the way a module in the field goes: the supervisor's checks (the wasm preamble,
wasm-validate), then a worker from the zygote, in its sandbox, that parses it, instantiates it
in wasm3, runs ap_init and one window. wasm3 is known to crash on mutated input; that must cost
one worker, never the supervisor (this process), and no worker may run outside its sandbox.

    python benchmarks/fuzz_modules.py [--count 10000] [--seed N] [--engine wasm3|wasmtime]

(--engine wasmtime: the mutants are compiled by Cranelift in the worker's sandbox instead.)

Mutations: flip bits, set random bytes, overwrite with interesting values (0, 0xff, 0x80, LEB128
continuation bytes), delete or duplicate a span, truncate, swap two spans. Findings (a worker
that reports a missing sandbox layer, an exception of an unexpected type here) go to
build/fuzz-modules/ with the seed and the bytes.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.runtime.process import ModuleFault, WorkerProcess  # noqa: E402
from appliance.runtime.wasm_binary import parse  # noqa: E402
from appliance.runtime.wire import HEADER, load_message, pack_header  # noqa: E402

OUT = REPO / "build" / "fuzz-modules"
# Each with params it accepts, so that a mutant gets as far as its windows.
SOURCES = {"vibstats": "baseline.windows=1\n", "process": "signal.0.name=x\nsignal.0.max=1\n",
           "motion": "", "bearing": "bearing.balls=9\nbearing.ball_diameter=7.94\nbearing.pitch_diameter=39.04\n"
                                    "shaft_hz=29.95\n"}
LAYERS = ("identity", "network", "limits", "landlock", "seccomp")


def sections(data: bytes) -> dict[int, tuple[int, int]]:
    """Section id -> (offset, size) of the original: mutations aimed at the data and code
    sections keep a module valid far more often, and valid-but-wrong modules are what reach
    wasm3 (an invalid one never gets past wasm-validate)."""
    return {sec.id: (sec.offset, sec.size) for sec in parse(data).sections}


def mutate(data: bytes, rng: random.Random, spans: dict[int, tuple[int, int]]) -> bytes:
    b = bytearray(data)
    target = rng.random()
    lo, size = spans.get(11 if target < 0.4 else 10, (8, len(b) - 8)) if target < 0.8 else (8, len(b) - 8)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        op = rng.randrange(7) if target >= 0.8 else rng.randrange(3)   # inside a section: change, never move
        at = min(lo + rng.randrange(max(size, 1)), len(b) - 1)
        if op == 0:
            b[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[at] = rng.randrange(256)
        elif op == 2:
            b[at] = rng.choice((0, 0xFF, 0x80, 0x7F, 0x40, 0xC0))
        elif op == 3:
            del b[at:at + rng.randrange(1, 64)]
        elif op == 4:
            span = b[at:at + rng.randrange(1, 64)]
            b[at:at] = span
        elif op == 5:
            del b[rng.randrange(8, max(9, len(b))):]
        else:
            n = rng.randrange(1, 32)
            other = rng.randrange(8, max(9, len(b) - n))
            b[at:at + n], b[other:other + n] = b[other:other + n], b[at:at + n]
    return bytes(b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=20261206)
    ap.add_argument("--engine", choices=("wasm3", "wasmtime"), default="wasm3")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    originals = {name: (REPO / "modules" / "build" / f"{name}.wasm").read_bytes() for name in SOURCES}
    spans = {name: sections(data) for name, data in originals.items()}
    names = list(SOURCES)
    window = np.zeros((1, 1024), np.float32)
    outcomes: collections.Counter[str] = collections.Counter()
    findings = []
    started = time.monotonic()
    for case in range(args.count):
        name = names[case % len(names)]
        wasm = mutate(originals[name], rng, spans[name])
        try:
            worker = WorkerProcess(f"fuzz{case}", wasm, HEADER.size + (1 << 16), load_message(
                f"{name}.wasm", SOURCES[name], memory_budget_bytes=256 << 20, backend=args.engine))
        except ModuleFault as fault:
            outcomes[f"refused: {fault.kind}"] += 1
            continue
        except Exception as exc:   # noqa: BLE001 - the point: anything else is a finding
            findings.append({"case": case, "module": name, "error": f"{type(exc).__name__}: {exc}"})
            (OUT / f"case{case}.wasm").parent.mkdir(parents=True, exist_ok=True)
            (OUT / f"case{case}.wasm").write_bytes(wasm)
            continue
        missing = [layer for layer in LAYERS if not worker.sandbox_layers.get(layer)]
        if missing:
            findings.append({"case": case, "module": name, "error": f"worker outside its sandbox: {missing}"})
        try:
            reply = worker.process(pack_header(1, 1024, 1000.0, 0), window, 2.0)
            outcomes[f"ran: rc {'0' if reply['rc'] == 0 else 'non-zero'}"] += 1
        except ModuleFault as fault:
            outcomes[f"faulted in a window: {fault.kind}"] += 1
        finally:
            worker.stop(0.2)
        if (case + 1) % 1000 == 0:
            print(f"{case + 1} cases, {time.monotonic() - started:.0f} s: {dict(outcomes)}", flush=True)
    print(f"\n{args.count} mutated modules (seed {args.seed}, {args.engine}) in {time.monotonic() - started:.0f} s; "
          f"the supervisor survived every one")
    for what, n in sorted(outcomes.items()):
        print(f"  {n:6d}  {what}")
    print(f"findings: {len(findings)}")
    if findings:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "findings.json").write_text(json.dumps(findings, indent=1))
        for f in findings[:20]:
            print(f"  case {f['case']} ({f['module']}): {f['error']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
