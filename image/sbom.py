"""What is in the image: every Debian and Python package with its exact version.

`make image` writes build/image/manifest.txt (one package a line, sorted, for diffs) and
build/image/sbom.spdx.json (SPDX 2.3, with package URLs), and compares the manifest with the one
recorded in the repo (image/manifest.txt). Python packages come from the lock, so they only move
with a `make lock` commit; Debian's do move under a rebuilt base (point releases, security
updates), and the build says which did. `make image RECORD_MANIFEST=1` records a new manifest.
"""
from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

RECORDED = Path(__file__).resolve().parent / "manifest.txt"


@dataclass(frozen=True, order=True)
class Package:
    kind: str       # "deb" or "py"
    name: str
    version: str
    arch: str       # Debian architecture; "" for Python packages

    def line(self) -> str:
        return f"{self.kind} {self.name} {self.version}" + (f" {self.arch}" if self.arch else "")

    def purl(self) -> str:
        if self.kind == "deb":
            return f"pkg:deb/debian/{self.name}@{self.version}?arch={self.arch}&distro=debian-12"
        return f"pkg:pypi/{self.name}@{self.version}"


def debian_packages(root: Path) -> list[Package]:
    """Read the root's dpkg database with the host's dpkg-query (no emulation needed)."""
    out = subprocess.run(["dpkg-query", f"--admindir={root / 'var/lib/dpkg'}", "-W",
                          "-f", "${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n"],
                         check=True, capture_output=True, text=True).stdout
    packages = []
    for line in out.splitlines():
        status, name, version, arch = line.split("\t")
        if status.startswith("ii"):
            packages.append(Package("deb", name, version, arch))
    return packages


def python_packages(site_packages: Path) -> list[Package]:
    packages = []
    for meta in sorted(site_packages.glob("*.dist-info/METADATA")):
        fields = dict(re.findall(r"^(Name|Version): (.+)$", meta.read_text(errors="replace"), re.M))
        name = re.sub(r"[-_.]+", "-", fields["Name"]).lower()
        packages.append(Package("py", name, fields["Version"].strip(), ""))
    return packages


def inventory(root: Path) -> list[Package]:
    venvs = sorted((root / "opt/appliance/venv/lib").glob("python3*/site-packages"))
    if len(venvs) != 1:
        raise RuntimeError(f"expected one site-packages in the image's venv, found {venvs}")
    return sorted(debian_packages(root) + python_packages(venvs[0]))


def manifest_text(packages: list[Package]) -> str:
    return ("# Every package in the image (image/sbom.py): kind, name, version[, architecture].\n"
            + "".join(p.line() + "\n" for p in packages))


def parse_manifest(text: str) -> dict[tuple[str, str], str]:
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            kind, name, version, *_ = line.split()
            out[(kind, name)] = version
    return out


def moved(recorded: str, current: str) -> list[str]:
    """What differs between two manifests, one line each: changed, added, removed."""
    old, new = parse_manifest(recorded), parse_manifest(current)
    lines = []
    for key in sorted(old.keys() | new.keys()):
        kind, name = key
        if key not in new:
            lines.append(f"removed {kind} {name} {old[key]}")
        elif key not in old:
            lines.append(f"added   {kind} {name} {new[key]}")
        elif old[key] != new[key]:
            lines.append(f"moved   {kind} {name} {old[key]} -> {new[key]}")
    return lines


def spdx(packages: list[Package], image_name: str, version: str, created: str) -> dict:
    return {
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT",
        "name": image_name,
        "documentNamespace": f"https://factory-gateway.invalid/spdx/{image_name}-{version}",
        "creationInfo": {"created": created, "creators": ["Tool: factory-gateway-appliance image/build.py"]},
        "packages": [{
            "name": p.name, "SPDXID": f"SPDXRef-{p.kind}-{re.sub(r'[^A-Za-z0-9.-]', '-', p.name)}",
            "versionInfo": p.version, "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": p.purl()}],
        } for p in packages],
    }


def write(root: Path, out_dir: Path, image_name: str, version: str, created: str,
          record: bool = False) -> list[str]:
    """Write manifest.txt and sbom.spdx.json to out_dir; return what moved since the recorded
    manifest (and record the new one when asked)."""
    packages = inventory(root)
    text = manifest_text(packages)
    (out_dir / "manifest.txt").write_text(text)
    (out_dir / "sbom.spdx.json").write_text(json.dumps(spdx(packages, image_name, version, created), indent=1) + "\n")
    changes = moved(RECORDED.read_text(), text) if RECORDED.exists() else [f"no recorded manifest at {RECORDED}"]
    (out_dir / "manifest-moved.txt").write_text("".join(line + "\n" for line in changes))
    if record:
        RECORDED.write_text(text)
    return changes
