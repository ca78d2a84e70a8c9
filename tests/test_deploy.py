"""Module bundles and deploys (docs/deploy.md): signatures that hold, an atomic swap, probation,
rollback on a fault, and a kill at any moment of a swap leaving the old or the new version."""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from appliance.config.schema import ConfigError, ModuleSection, RuntimeSection, load_config
from appliance.core.supervisor import Supervisor
from appliance.deploy.bundle import BundleRejected, make_bundle, open_bundle, sign_bundle
from appliance.deploy.deployer import DeployRefused
from appliance.deploy.keys import load_private, new_pair, parse_public
from appliance.deploy.store import ModuleStore
from appliance.runtime.modcheck import simd_file
from appliance_tools.fleet.rig import build_version

from conftest import REPO
from support import FAST_RESTART, metric, sim_source, wait_for

@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """Keys and bundles: 1.0.0 (the YAML's file), 1.1.0 good, 1.2.0 traps after 3 windows, 1.3.0 good."""
    tmp = tmp_path_factory.mktemp("deploy")
    private, public = new_pair("plant", tmp / "keys")
    _, other_public = new_pair("stranger", tmp / "keys")
    key = load_private(private)
    wasm = {v: build_version(tmp, v, b, t) for v, b, t in (("1.0.0", 1, 0), ("1.1.0", 2, 0), ("1.2.0", 3, 3),
                                                                ("1.3.0", 4, 0))}
    (tmp / "bundles").mkdir()
    signed = {}
    for version, path in wasm.items():
        signed[version] = make_bundle(path, tmp / "bundles" / f"versioned-{version}.apb")
        sign_bundle(signed[version], key)
    unsigned = make_bundle(wasm["1.1.0"], tmp / "bundles" / "unsigned.apb")
    return {"tmp": tmp, "key": key, "public": public.read_text().strip(), "stranger": other_public.read_text().strip(),
            "wasm": wasm, "signed": signed, "unsigned": unsigned}


# ---- bundles ------------------------------------------------------------------------------------

def rewrite_member(src: Path, dst: Path, name: str, change) -> Path:
    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == name:
                data = change(data)
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dst


def test_a_signed_bundle_opens_and_every_tampering_is_refused(kit, tmp_path):
    trusted = [parse_public(kit["public"])]
    good = open_bundle(kit["signed"]["1.1.0"], trusted=trusted, allow_unsigned=False)
    assert (good.module, good.version, good.signer) == ("versioned", "1.1.0", "plant")
    assert good.wasm == kit["wasm"]["1.1.0"].read_bytes()

    def flip(data: bytes) -> bytes:
        return data[:100] + bytes([data[100] ^ 1]) + data[101:]

    cases = {
        "one byte of the .wasm": (rewrite_member(kit["signed"]["1.1.0"], tmp_path / "a.apb", "module.wasm", flip),
                                  "module.wasm: its sha256 or size differs from the index"),
        "the index (a higher version)": (rewrite_member(kit["signed"]["1.1.0"], tmp_path / "b.apb", "bundle.json",
                                                        lambda d: d.replace(b'"1.1.0"', b'"1.1.1"')),
                                         "is versioned 1.1.0, the index says versioned 1.1.1"),
        "the index (its file list, consistently)": (
            rewrite_member(kit["signed"]["1.2.0"], tmp_path / "c.apb", "bundle.json",
                           lambda d: json.dumps(json.loads(d), sort_keys=True, indent=1).encode()),
            "bad signature"),
    }
    for what, (path, expected) in cases.items():
        with pytest.raises(BundleRejected, match=expected):
            open_bundle(path, trusted=trusted, allow_unsigned=False)
        print(f"tampered {what}: refused")
    with pytest.raises(BundleRejected, match="not among deploy.trusted_keys"):
        open_bundle(kit["signed"]["1.1.0"], trusted=[parse_public(kit["stranger"])], allow_unsigned=False)
    with pytest.raises(BundleRejected, match="unsigned"):
        open_bundle(kit["unsigned"], trusted=trusted, allow_unsigned=False)
    assert open_bundle(kit["unsigned"], trusted=trusted, allow_unsigned=True).signer is None


def test_a_bundle_with_anything_but_plain_listed_files_is_refused(kit, tmp_path):
    base = kit["signed"]["1.1.0"]
    with tarfile.open(base) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]

    def write(extra: tarfile.TarInfo, data: bytes = b"") -> Path:
        out = tmp_path / f"{extra.name.replace('/', '_')}.apb"
        with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
            for info, d in members:
                tar.addfile(info, io.BytesIO(d))
            tar.addfile(extra, io.BytesIO(data))
        return out

    link = tarfile.TarInfo("nn-0000000000000000-x86_64.so")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    escape = tarfile.TarInfo("../../etc/cron.d/x")
    escape.size = 1
    unlisted = tarfile.TarInfo("nn-0123456789abcdef-x86_64.so")
    unlisted.size = 4
    for info, data, reason in ((link, b"", "not a plain file"), (escape, b"x", "unexpected file"),
                               (unlisted, b"\x7fELF", "not listed")):
        with pytest.raises(BundleRejected, match=reason):
            open_bundle(write(info, data), trusted=[parse_public(kit["public"])], allow_unsigned=False)
    with pytest.raises(BundleRejected, match="not a bundle"):
        open_bundle(b"\0asm\x01\0\0\0" + b"\0" * 600, trusted=(), allow_unsigned=True)

    # A sparse member: a few hundred bytes that would expand to 64 MiB each in memory.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        bomb = tarfile.TarInfo("nn-0000000000000001-x86_64.so")
        bomb.pax_headers = {"GNU.sparse.size": str(64 << 20), "GNU.sparse.numblocks": "1",
                            "GNU.sparse.map": f"{(64 << 20) - 1},0"}
        tar.addfile(bomb, io.BytesIO(b""))
    with pytest.raises(BundleRejected, match="not a plain file|claim more bytes"):
        open_bundle(buf.getvalue(), trusted=(), allow_unsigned=True)
    # An index nested deeper than the parser's recursion limit.
    deep = rewrite_member(base, tmp_path / "deep.apb", "bundle.json", lambda d: b"[" * 200_000)
    with pytest.raises(BundleRejected, match="bundle.json cannot be read"):
        open_bundle(deep, trusted=(), allow_unsigned=True)


def test_the_store_never_leaves_its_folder_and_rechecks_what_it_holds(kit, tmp_path):
    store = ModuleStore(tmp_path / "store")
    bundle = open_bundle(kit["signed"]["1.1.0"], trusted=[parse_public(kit["public"])], allow_unsigned=False)
    installed = store.install(bundle)
    assert store.installed("versioned", "1.1.0") == installed
    outside = tmp_path / "evil"
    shutil.copytree(installed.folder, outside)
    for version in ("1.1.0/../../../evil", "../evil", "1.1.0/.."):
        assert store.installed("versioned", version) is None, version
    # A folder whose bundle.json names another module or version is not that version.
    shutil.copytree(installed.folder, store.folder("versioned") / "1.9.0")
    assert store.installed("versioned", "1.9.0") is None
    # A file changed on the card since: not run.
    (installed.folder / "module.wasm").write_bytes(b"\0asm\x01\0\0\0")
    assert store.installed("versioned", "1.1.0") is None


def test_bundles_are_reproducible_and_carry_a_compiled_models_native_twins(tmp_path):
    built = REPO / "modules" / "build" / "people_cnn.wasm"
    a = make_bundle(built, tmp_path / "a.apb")
    b = make_bundle(built, tmp_path / "b.apb")
    assert a.read_bytes() == b.read_bytes()
    files = open_bundle(a, trusted=(), allow_unsigned=True).files
    assert sorted(n.rsplit("-", 1)[1] for n in files if n.startswith("nn-")) == ["aarch64.so", "x86_64.so"]
    # Its SIMD build travels with it and lands beside module.wasm, where a wasmtime module finds it.
    assert files["module.simd.wasm"] == built.with_name("people_cnn.simd.wasm").read_bytes()
    installed = ModuleStore(tmp_path / "store").install(open_bundle(a, trusted=(), allow_unsigned=True))
    mod = ModuleSection.model_validate({"wasm": str(installed.wasm), "source": "cam", "engine": "wasmtime"})
    assert simd_file(mod, RuntimeSection()) == installed.folder / "module.simd.wasm"


def test_a_simd_build_of_another_version_is_never_bundled_or_accepted(tmp_path, kit):
    """module.simd.wasm runs in module.wasm's place: one built beside another version must not."""
    folder = tmp_path / "mod"
    folder.mkdir()
    wasm = folder / "versioned.wasm"
    shutil.copy(kit["wasm"]["1.1.0"], wasm)
    foreign = (REPO / "modules" / "build" / "vibstats.simd.wasm").read_bytes()
    (folder / "versioned.simd.wasm").write_bytes(foreign)
    with pytest.raises(BundleRejected, match="is not the SIMD build of"):
        make_bundle(wasm, tmp_path / "x.apb")
    # Slipped into a bundle by hand (its index made to match, unsigned): refused on opening, and
    # signing refuses it too, so no trusted key vouches for it.
    plain = wasm.read_bytes()
    members = {"module.wasm": plain, "module.simd.wasm": foreign}
    index = json.dumps({"format": 1, "module": "versioned", "version": "1.1.0", "files": {
        n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in members.items()}}).encode()
    path = tmp_path / "forged.apb"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [("bundle.json", index), *members.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(BundleRejected, match="module.simd.wasm is not the SIMD build of this module.wasm"):
        sign_bundle(path, kit["key"])   # signing checks the files first
    with pytest.raises(BundleRejected, match="module.simd.wasm is not the SIMD build.*names another build"):
        open_bundle(path, trusted=(), allow_unsigned=True)
    # A name with a trailing newline is another name: not listed among the files a bundle may hold.
    index = json.dumps({"format": 1, "module": "versioned", "version": "1.1.0", "files": {
        n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in
        (("module.wasm", plain), ("module.simd.wasm\n", foreign))}}).encode()
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("bundle.json", index), ("module.wasm", plain), ("module.simd.wasm\n", foreign)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(BundleRejected, match="unexpected file"):
        open_bundle(path, trusted=(), allow_unsigned=True)


def test_trusted_keys_in_the_yaml_are_checked_with_their_line(tmp_path):
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump({"sources": {"a": sim_source()},
                                    "deploy": {"trusted_keys": ["ed25519:dGVzdA== short"]}}))
    with pytest.raises(ConfigError, match=r"appliance.yaml:\d+:\d+: deploy.trusted_keys.0: .*4 bytes, an Ed25519 "
                                          r"key has 32"):
        load_config(path)


# ---- deploys on a running supervisor --------------------------------------------------------------

def gateway(tmp_path: Path, kit, probation: int = 8, **deploy) -> Supervisor:
    return Supervisor(load_config(gateway_config(tmp_path, kit, probation, **deploy)))


def gateway_config(tmp_path: Path, kit, probation: int = 8, **deploy) -> Path:
    doc = {"gateway": {"name": "gw", "data_dir": str(tmp_path / "var")}, "metrics": {"enabled": False},
           "runtime": {"restart": FAST_RESTART},
           "deploy": {"trusted_keys": [kit["public"]], "probation_windows": probation, **deploy},
           "sources": {"a": sim_source()},
           "modules": {"versioned": {"wasm": str(kit["wasm"]["1.0.0"]), "source": "a", "window": {"size": 256}}}}
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def build_running(sup) -> float:
    return sup.modules["versioned"].last_features.get("build", 0.0)


def spooled(sup, kind: str) -> list[dict]:
    return [e for e in sup.spool.tail(10_000) if e["kind"] == kind]


def test_a_good_version_passes_probation_and_a_bad_one_rolls_back_by_itself(tmp_path, kit):
    sup = gateway(tmp_path, kit)
    sup.start()
    try:
        wait_for(lambda: build_running(sup) == 1, 20, "version 1.0.0 (the YAML's file) running")
        reply = sup.deployer.deploy(kit["signed"]["1.1.0"], "test")
        assert "version 1.1.0 (signed by plant) running, on probation for 8 windows" in reply, reply
        wait_for(lambda: build_running(sup) == 2, 20, "1.1.0 running")
        wait_for(lambda: spooled(sup, "module_deployed"), 20, "1.1.0 kept after its probation")
        assert metric(sup, "appliance_module_deploys_total", module="versioned", outcome="committed") == 1
        assert metric(sup, "appliance_module_version_info", module="versioned", version="1.1.0", origin="deployed",
                      signer="plant") == 1

        t0 = time.monotonic()
        sup.deployer.deploy(kit["signed"]["1.2.0"], "test")   # traps on its 4th window
        wait_for(lambda: spooled(sup, "module_rolled_back"), 30, "1.2.0 rolled back")
        took = time.monotonic() - t0
        event = spooled(sup, "module_rolled_back")[0]
        assert event["severity"] == "alarm"
        assert "version 1.2.0 rolled back to 1.1.0 during probation: trap" in event["message"], event["message"]
        wait_for(lambda: build_running(sup) == 2, 20, "1.1.0 running again")
        assert metric(sup, "appliance_module_deploys_total", module="versioned", outcome="rolled_back") == 1
        assert metric(sup, "appliance_module_on_probation", module="versioned") == 0
        print(f"bad version deployed -> rolled back and the old one running: {took:.2f} s")

        # A version that was rolled back is not taken again; nothing changes.
        with pytest.raises(DeployRefused, match="version 1.2.0 was rolled back before"):
            sup.deployer.deploy(kit["signed"]["1.2.0"], "test")
        assert build_running(sup) == 2
    finally:
        sup.stop()

    # After a restart the kept version runs, not the YAML's file.
    sup = gateway(tmp_path, kit)
    sup.start()
    try:
        wait_for(lambda: build_running(sup) == 2, 20, "1.1.0 after a restart")
        assert sup.deployer.describe("versioned")["version"] == "1.1.0"
        assert sup.deployer.revert("versioned").startswith("module versioned: deployed version 1.1.0 dropped")
        wait_for(lambda: build_running(sup) == 1, 20, "the YAML's file after revert")
    finally:
        sup.stop()


def test_refused_bundles_change_nothing(tmp_path, kit):
    sup = gateway(tmp_path, kit)
    sup.start()
    try:
        wait_for(lambda: build_running(sup) == 1, 20, "1.0.0")
        pid = sup.modules["versioned"].worker_pid
        tampered = rewrite_member(kit["signed"]["1.1.0"], tmp_path / "t.apb", "module.wasm",
                                  lambda d: d[:-1] + bytes([d[-1] ^ 1]))
        for source, reason in ((tampered, "sha256 or size differs"), (kit["unsigned"], "unsigned"),
                               (tmp_path / "missing.apb", "No such file")):
            with pytest.raises(DeployRefused, match=reason):
                sup.deployer.deploy(source, "test")
        assert sup.modules["versioned"].worker_pid == pid and build_running(sup) == 1
        assert metric(sup, "appliance_module_deploys_total", module="-", outcome="refused") == 3
        assert not (tmp_path / "var" / "modules" / "versioned" / "current").exists()
    finally:
        sup.stop()


def test_a_gateway_stopped_during_probation_keeps_watching_the_new_version(tmp_path, kit):
    sup = gateway(tmp_path, kit, probation=1_000_000)
    sup.start()
    try:
        wait_for(lambda: build_running(sup) == 1, 20, "1.0.0")
        sup.deployer.deploy(kit["signed"]["1.1.0"], "test")
        wait_for(lambda: build_running(sup) == 2, 20, "1.1.0")
    finally:
        sup.stop()
    store = ModuleStore(tmp_path / "var" / "modules")
    assert store.probation("versioned")["version"] == "1.1.0"
    sup = gateway(tmp_path, kit, probation=1_000_000)
    sup.start()
    try:
        wait_for(lambda: build_running(sup) == 2, 20, "1.1.0 after the restart")
        assert metric(sup, "appliance_module_on_probation", module="versioned") == 1
    finally:
        sup.stop()


# ---- a kill at any moment of a swap -------------------------------------------------------------

KILL_SCRIPT = """
import sys, time
from pathlib import Path
from appliance.config.schema import load_config
from appliance.core.supervisor import Supervisor
sup = Supervisor(load_config(Path(sys.argv[1])))
sup.start()
print("started", flush=True)
sys.stdin.readline()
print("deploying", flush=True)
sup.deployer.deploy(Path(sys.argv[2]), "test")
print("deployed", flush=True)
time.sleep(60)
"""


def run_deploy(config: Path, bundle: Path, kill_after_s: float | None) -> float:
    """A gateway process deploys `bundle`; SIGKILL after kill_after_s (None: let it finish).
    Returns how long the deploy ran (until the kill, or until it said it was done)."""
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(config), str(bundle)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, cwd=REPO, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "deploying"
        t0 = time.monotonic()
        if kill_after_s is None:
            assert proc.stdout.readline().strip() == "deployed"
        else:
            time.sleep(kill_after_s)
        return time.monotonic() - t0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_kill_during_a_swap_leaves_the_old_or_the_new_version(tmp_path, kit):
    """With 1.1.0 deployed, a gateway deploys 1.3.0 and is SIGKILLed at a random moment of it
    (verification, staging, the check worker, the swap, the new worker's start), 20 times; each
    time the store then resolves to 1.1.0 or 1.3.0, never to neither, and a supervisor started
    on it runs that version."""
    rng = random.Random(20261207)
    config = gateway_config(tmp_path, kit, probation=1_000_000)
    modules = tmp_path / "var" / "modules"
    store = ModuleStore(modules)
    run_deploy(config, kit["signed"]["1.1.0"], None)
    store.commit("versioned")   # as if 1.1.0 had passed its probation
    before = tmp_path / "modules-1.1.0"
    shutil.copytree(modules, before, symlinks=True)
    whole = 0.0
    for _ in range(2):   # how long a whole deploy takes here (the longer of two: the machine may be busy)
        shutil.rmtree(modules)
        shutil.copytree(before, modules, symlinks=True)
        whole = max(whole, run_deploy(config, kit["signed"]["1.3.0"], None))
        assert store.resolve("versioned")[0].version == "1.3.0"
    seen = {"1.1.0": 0, "1.3.0": 0}
    for i in range(20):   # one kill in each twentieth of 1.5 x a whole deploy: every stage gets its share
        shutil.rmtree(modules)
        shutil.copytree(before, modules, symlinks=True)
        run_deploy(config, kit["signed"]["1.3.0"], (i + rng.random()) / 20 * 1.5 * whole)
        installed, _ = store.resolve("versioned")
        version = installed.version if installed else "neither (the YAML's file)"
        assert version in seen, version
        seen[version] += 1
    print(f"20 kills within a deploy ({whole * 1000:.0f} ms whole): the old version after {seen['1.1.0']}, "
          f"the new one after {seen['1.3.0']}")
    assert seen["1.1.0"] and seen["1.3.0"], f"the kills did not land on both sides of the swap: {seen}"
    installed, _ = store.resolve("versioned")
    sup = Supervisor(load_config(config))
    sup.start()
    try:
        want = {"1.1.0": 2, "1.3.0": 4}[installed.version]
        wait_for(lambda: build_running(sup) == want, 20, f"build {want} after the kills")
    finally:
        sup.stop()


def test_bundle_cli_makes_signs_and_verifies(tmp_path, kit):
    run = [sys.executable, "-m", "appliance"]
    out = subprocess.run([*run, "keys", "new", "ci", "--dir", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0 and "trusted_keys" in out.stdout, out
    assert (tmp_path / "ci.key").stat().st_mode & 0o777 == 0o600
    again = subprocess.run([*run, "keys", "new", "ci", "--dir", str(tmp_path)], capture_output=True, text=True)
    assert again.returncode == 1 and "never overwritten" in again.stderr
    apb = tmp_path / "v.apb"
    assert subprocess.run([*run, "module", "bundle", str(kit["wasm"]["1.1.0"]), "-o", str(apb)]).returncode == 0
    assert subprocess.run([*run, "module", "sign", str(apb), "--key", str(tmp_path / "ci.key")]).returncode == 0
    ok = subprocess.run([*run, "module", "verify", str(apb), "--key", str(tmp_path / "ci.pub")],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "versioned 1.1.0, signed by ci" in ok.stdout, ok
    bad = subprocess.run([*run, "module", "verify", str(apb), "--key", kit["public"]], capture_output=True, text=True)
    assert bad.returncode == 1 and "not among deploy.trusted_keys" in bad.stderr, bad


def test_the_console_deploys_a_bundle_from_the_modules_directory_and_reverts(tmp_path, kit):
    from appliance.ops.control.client import ControlClient
    modules_dir = tmp_path / "modules-dir"
    modules_dir.mkdir()
    shutil.copy(kit["signed"]["1.1.0"], modules_dir / "versioned-1.1.0.apb")
    shutil.copy(kit["unsigned"], modules_dir / "unsigned.apb")
    path = gateway_config(tmp_path, kit)
    doc = yaml.safe_load(path.read_text())
    doc["runtime"]["modules_dir"] = str(modules_dir)
    path.write_text(yaml.safe_dump(doc))
    sup = Supervisor(load_config(path))
    sup.start()
    client = ControlClient(sup.control.path)
    try:
        wait_for(lambda: build_running(sup) == 1, 20, "1.0.0")
        reply = client.request("modules load versioned unsigned.apb")
        assert not reply.ok and "refused, nothing changed: " in reply.lines[0] and "unsigned" in reply.lines[0], reply
        reply = client.request(f"modules load versioned {kit['signed']['1.1.0']}")   # outside the modules directory
        assert not reply.ok and "modules load takes modules from" in reply.lines[0], reply
        reply = client.request("modules load vibstats versioned-1.1.0.apb")
        assert not reply.ok and "no module" in reply.lines[0] or "not 'vibstats'" in reply.lines[0], reply
        reply = client.request("modules load versioned versioned-1.1.0.apb")
        assert reply.ok and "version 1.1.0 (signed by plant) running, on probation" in reply.lines[0], reply
        wait_for(lambda: build_running(sup) == 2, 20, "1.1.0")
        stats = client.request("modules stats versioned")
        assert any(line.startswith("version    1.1.0 (deployed, signed by plant") for line in stats.lines), stats
        reply = client.request("modules revert versioned")
        assert reply.ok and "deployed version 1.1.0 dropped" in reply.lines[0], reply
        wait_for(lambda: build_running(sup) == 1, 20, "the YAML's file again")
    finally:
        client.close()
        sup.stop()


# ---- configs delivered by the fleet ----------------------------------------------------------------

def card_gateway(tmp_path: Path, kit, probation_s: float = 5.0, write: bool = True):
    """A supervisor as `appliance run` makes one: the card's YAML (written unless write is
    false: a restart), and the file chosen to run."""
    from appliance.deploy.configs import ConfigStore
    card = tmp_path / "appliance.yaml"
    if write:
        gateway_config(tmp_path, kit)
        doc = yaml.safe_load(card.read_text())
        doc["deploy"]["config_probation_s"] = probation_s
        doc["modules"]["versioned"]["wasm"] = os.path.relpath(kit["wasm"]["1.0.0"], tmp_path)   # relative to the card
        card.write_text(yaml.safe_dump(doc))
    doc = yaml.safe_load(card.read_text())
    chosen = ConfigStore(tmp_path / "var" / "config", card).choose()
    from appliance.config.schema import load_config_document
    sup = Supervisor(load_config_document(chosen, card.parent)[1])
    sup.use_config_files(card, chosen)
    return sup, card, doc


def test_a_delivered_config_is_kept_when_healthy_and_rolled_back_when_not(tmp_path, kit):
    sup, card, doc = card_gateway(tmp_path, kit)
    sup.start()
    try:
        wait_for(lambda: build_running(sup) == 1, 20, "the card's config running")
        # Not even YAML: refused with file:line, nothing changed.
        with pytest.raises(ValueError, match=r"candidate.yaml:\d+:\d+: .*refused|refused, nothing changed: .*candidate"
                                             r".yaml:\d+"):
            sup.configs.apply(b"sources: [unclosed", "test")
        # A good one (its relative module path resolves from the card's folder): kept.
        good = json.loads(json.dumps(doc))
        good["modules"]["versioned"]["params"] = {"gain": 2}
        reply = sup.configs.apply(yaml.safe_dump(good).encode(), "test")
        assert "on probation" in reply, reply
        wait_for(lambda: spooled(sup, "config_deployed"), 20, "the delivered config kept")
        assert sup.config_path == tmp_path / "var" / "config" / "current.yaml"
        assert sup.configs.running()["source"] == "delivered"
        # One whose new source never delivers: rolled back to the delivered good one within its probation.
        bad = json.loads(json.dumps(good))
        bad["sources"]["dead"] = {"type": "i2c_accel", "chip": "adxl345", "bus": 97}
        bad["modules"]["second"] = {**bad["modules"]["versioned"], "source": "dead"}
        t0 = time.monotonic()
        sup.configs.apply(yaml.safe_dump(bad).encode(), "test")
        wait_for(lambda: spooled(sup, "config_rolled_back"), 30, "the unhealthy config rolled back")
        event = spooled(sup, "config_rolled_back")[0]
        assert "not healthy within 5 s" in event["message"] and "source dead" in event["message"], event["message"]
        assert "dead" not in sup.sources and "second" not in sup.modules
        print(f"unhealthy config rolled back after {time.monotonic() - t0:.1f} s: {event['message']}")
        with pytest.raises(ValueError, match="rolled back before"):
            sup.configs.apply(yaml.safe_dump(bad).encode(), "test")
    finally:
        sup.stop()

    # The delivered config runs after a restart, until the card's file is edited: then the card wins.
    sup, card, doc = card_gateway(tmp_path, kit, write=False)
    assert sup.config_path.name == "current.yaml" and sup.cfg.modules["versioned"].params == {"gain": 2}
    sup.spool.close()
    card.write_text(card.read_text().replace("probation_windows: 8", "probation_windows: 9"))
    sup, card, doc = card_gateway(tmp_path, kit, write=False)
    assert sup.config_path == card and sup.cfg.deploy.probation_windows == 9
    assert (tmp_path / "var" / "config" / "superseded.yaml").exists()
    sup.spool.close()


def test_signed_documents_hold_only_as_signed(tmp_path):
    from appliance.deploy.keys import document_signer, sign_document
    key_path, pub_path = new_pair("ops", tmp_path)
    key, trusted = load_private(key_path), [parse_public(pub_path.read_text())]
    doc = sign_document({"revision": 7, "modules": {"vibstats": {"version": "1.2.0"}}}, key)
    assert document_signer(doc, trusted) == "ops"
    downgraded = json.loads(json.dumps(doc))
    downgraded["modules"]["vibstats"]["version"] = "1.0.0"
    with pytest.raises(ValueError, match="bad signature"):
        document_signer(downgraded, trusted)
    with pytest.raises(ValueError, match="unsigned"):
        document_signer({"revision": 8, "modules": {}}, trusted)
    _, other = new_pair("other", tmp_path / "o")
    with pytest.raises(ValueError, match="not among fleet.operator_keys"):
        document_signer(doc, [parse_public(other.read_text())])
