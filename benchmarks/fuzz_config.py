"""`make fuzz-config`: mutated copies of the shipped configs through `appliance validate`'s code path.

Every copy must end in a clean verdict: it loads (and its modules accept their params), or it is
refused with config errors that each carry file:line:column. Anything else (a traceback, an error
without a place) is a finding: the seed, the mutation and the text go to build/fuzz/.

    python benchmarks/fuzz_config.py [--count 10000] [--seed N]

Mutations, on the parsed YAML (a random node) or on the text: delete, rename (a typo of the key),
retype (numbers, strings, lists, mappings, null, booleans, huge and negative numbers, NaN, very
long strings and paths, unicode), duplicate, insert a key; flip, delete or duplicate characters
and lines; truncate.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import sys
import tempfile
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "build" / "fuzz"
PLACE = re.compile(r":\d+:\d+: ")

WEIRD = [None, True, False, 0, -1, 1, 2 ** 63, -(2 ** 70), 1e308, -1e-308, float("nan"), float("inf"), "", " ",
         "x" * 5000, "../" * 400 + "x.wasm", "y" * 300 + ".wasm", "/dev/zero", "/proc/self/mem", "é\u202e\x00", "0x10", "1e999",
         [], [1, 2, 3], [[0, 0], [1]], {}, {"a": {"b": {"c": 1}}}, "${HOME}", "*", "- a", "a: b", 3.5, -0.0]


def nodes(data, path=()):
    """Every (path, value) in the document."""
    yield path, data
    if isinstance(data, dict):
        for k, v in list(data.items()):
            yield from nodes(v, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from nodes(v, path + (i,))


def parent_of(data, path):
    for step in path[:-1]:
        data = data[step]
    return data


def typo(rng: random.Random, text: str) -> str:
    if not text:
        return "x"
    i = rng.randrange(len(text))
    op = rng.randrange(4)
    if op == 0:
        return text[:i] + text[i + 1:]
    if op == 1:
        return text[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz_.") + text[i:]
    if op == 2 and len(text) > 1:
        j = min(i + 1, len(text) - 1)
        return text[:i] + text[j] + text[i] + text[j + 1:]
    return text[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz") + text[i + 1:]


def mutate_tree(rng: random.Random, data):
    """One structural mutation of the document (in place); returns what it did."""
    paths = [p for p, _ in nodes(data) if p]
    if not paths:
        return "nothing to mutate"
    path = rng.choice(paths)
    parent, key = parent_of(data, path), path[-1]
    op = rng.randrange(6)
    where = ".".join(map(str, path))
    if op == 0:
        del parent[key]
        return f"delete {where}"
    if op == 1 and isinstance(parent, dict) and isinstance(key, str):
        new = typo(rng, key)
        parent[new] = parent.pop(key)
        return f"rename {where} -> {new}"
    if op == 2:
        parent[key] = rng.choice(WEIRD)
        return f"retype {where} = {parent[key]!r:.60}"
    if op == 3 and isinstance(parent, dict):
        parent[typo(rng, str(key))] = rng.choice(WEIRD)
        return f"insert beside {where}"
    if op == 4 and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = rng.choice([parent[key] * 10 ** rng.randint(1, 12), -parent[key], parent[key] + 0.5])
        return f"scale {where}"
    if op == 5 and isinstance(parent[key], str):
        parent[key] = typo(rng, parent[key])
        return f"typo in the value of {where}"
    parent[key] = rng.choice(WEIRD)
    return f"retype {where}"


def mutate_text(rng: random.Random, text: str) -> tuple[str, str]:
    lines = text.split("\n")
    op = rng.randrange(5)
    i = rng.randrange(len(lines))
    if op == 0:
        del lines[i]
        return "\n".join(lines), f"delete line {i + 1}"
    if op == 1:
        lines.insert(i, lines[i])
        return "\n".join(lines), f"duplicate line {i + 1}"
    if op == 2 and text:
        j = rng.randrange(len(text))
        return text[:j] + rng.choice("\t:-[]{}#&*!|>'\"%@` \x00é") + text[j + 1:], f"flip char {j}"
    if op == 3:
        return text[: rng.randrange(len(text) + 1)], "truncate"
    lines[i] = " " * rng.randint(1, 5) + lines[i]
    return "\n".join(lines), f"indent line {i + 1}"


def verdict(path: Path) -> tuple[str, str]:
    """('ok' | 'config-error' | 'finding', detail): the validate path, in-process."""
    from appliance.config.schema import ConfigError, load_config_document
    from appliance.runtime.modcheck import check_modules
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            doc, cfg = load_config_document(path)
            issues = check_modules(doc, cfg)
        if issues:
            raise ConfigError(issues)
        return "ok", ""
    except ConfigError as exc:
        unplaced = [str(i) for i in exc.issues if not PLACE.search(str(i))]
        if unplaced:
            return "finding", "config error without file:line:column: " + unplaced[0]
        return "config-error", str(exc.issues[0])
    except Exception:
        return "finding", traceback.format_exc()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    import logging
    logging.disable(logging.WARNING)   # "no params manifest" warnings of mutated paths: not findings
    configs = sorted((REPO / "configs").glob("*.yaml"))
    counts = {"ok": 0, "config-error": 0, "finding": 0}
    findings = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        work = Path(tmp) / "work"
        (work / "configs").mkdir(parents=True)
        os.symlink(REPO / "modules", work / "modules")
        if (REPO.parent / "shared").exists():
            os.symlink(REPO.parent / "shared", Path(tmp) / "shared")
        for n in range(args.count):
            source = rng.choice(configs)
            text = source.read_text()
            if rng.random() < 0.6:
                data = yaml.safe_load(text)
                what = mutate_tree(rng, data)
                text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
            else:
                text, what = mutate_text(rng, text)
            path = work / "configs" / source.name
            path.write_text(text, errors="surrogateescape")
            kind, detail = verdict(path)
            counts[kind] += 1
            if kind == "finding":
                findings.append({"case": n, "config": source.name, "mutation": what, "detail": detail,
                                 "text": text})
                print(f"FINDING case {n} ({source.name}, {what}):\n{detail}", flush=True)
            if (n + 1) % 1000 == 0:
                print(f"fuzz-config: {n + 1} cases, {counts} ({time.monotonic() - t0:.0f} s)", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    report = {"seed": seed, "cases": args.count, "counts": counts, "seconds": round(time.monotonic() - t0, 1),
              "findings": findings}
    (OUT / f"fuzz-config-{seed}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"fuzz-config: seed {seed}, {args.count} cases: {counts['ok']} load, {counts['config-error']} refused "
          f"with file:line, {counts['finding']} tracebacks or unplaced errors ({report['seconds']:.0f} s)")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
