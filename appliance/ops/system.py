"""The gateway's own identity from the YAML: hostname and network (`appliance system apply`).

The root file system of the image is read-only, so nothing here writes to /etc: the hostname is
set in the kernel (sethostname) and the network goes to systemd-networkd's runtime directory
(/run/systemd/network), read at every boot. It runs before systemd-networkd. A YAML that cannot
be read still brings the network up with DHCP, so a gateway with a broken config stays reachable.
"""
from __future__ import annotations

import logging
import socket
from pathlib import Path

from appliance.config.network import NetworkSection

log = logging.getLogger("appliance.system")

NETWORK_FILE = "10-appliance.network"


def in_test_rig(cmdline: Path = Path("/proc/cmdline")) -> bool:
    """Booted by the image's test rig (appliance.testrig on the kernel command line)."""
    try:
        return "appliance.testrig" in cmdline.read_text().split()
    except OSError:
        return False


def hostname_for(network: NetworkSection, gateway_name: str) -> str:
    if network.hostname:
        return network.hostname
    name = "".join(c if c.isalnum() else "-" for c in gateway_name).strip("-")[:63]
    return name or "gateway"


def networkd_unit(network: NetworkSection) -> str:
    """A systemd.network(5) file for the section."""
    lines = ["# written at boot by `appliance system apply` from the appliance's YAML", "[Match]",
             f"Name={network.interface}", "", "[Network]"]
    if network.mode == "dhcp":
        lines.append("DHCP=yes")
    else:
        lines.append(f"Address={network.address}")
        if network.gateway:
            lines.append(f"Gateway={network.gateway}")
        lines += [f"DNS={server}" for server in network.dns]
    lines += [f"NTP={server}" for server in network.ntp]
    return "\n".join(lines) + "\n"


def apply(network: NetworkSection, gateway_name: str, *, networkd_dir: Path, set_hostname: bool = True) -> str:
    """Write the network unit and set the hostname; returns what was done, for the log."""
    networkd_dir.mkdir(parents=True, exist_ok=True)
    target = networkd_dir / NETWORK_FILE
    tmp = target.with_suffix(".tmp")
    tmp.write_text(networkd_unit(network))
    tmp.replace(target)
    host = hostname_for(network, gateway_name)
    if set_hostname:
        socket.sethostname(host)
    how = "DHCP" if network.mode == "dhcp" else f"static {network.address}"
    return f"hostname {host}; network {how} on {network.interface} ({target})"
