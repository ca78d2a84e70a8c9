"""The gateway's own identity from the YAML: hostname and network (`appliance system apply`).

The root file system of the image is read-only, so nothing here writes to /etc: the hostname is
set in the kernel (sethostname) and the network goes to systemd-networkd's runtime directory
(/run/systemd/network), read at every boot. It runs before systemd-networkd. A YAML that cannot
be read still brings the network up with DHCP, so a gateway with a broken config stays reachable.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from hal.schema import StrictModel

log = logging.getLogger("appliance.system")

NETWORK_FILE = "10-appliance.network"
DEFAULT_MATCH = "en* eth*"        # the wired interfaces, whatever the board names them


class NetworkSection(StrictModel):
    """`network:` - the gateway's hostname and wired network (applied at boot on the image)."""

    hostname: str | None = Field(None, pattern=r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$",
                                 description="host name (default: gateway.name with '_' and '.' as '-')")
    interface: str = Field(DEFAULT_MATCH, pattern=r"^[A-Za-z0-9*?_.: -]{1,64}$",
                           description="interface name(s) to configure, shell patterns allowed")
    mode: Literal["dhcp", "static"] = Field("dhcp", description="dhcp, or static with address/gateway/dns")
    address: str | None = Field(None, description="static: address with prefix, e.g. 192.168.10.20/24")
    gateway: str | None = Field(None, description="static: default router, e.g. 192.168.10.1")
    dns: list[str] = Field([], max_length=8, description="static: name servers")
    ntp: list[str] = Field([], max_length=8, description="time servers (default: DHCP's, then Debian's pool)")

    @field_validator("address")
    @classmethod
    def _interface_address(cls, value: str | None) -> str | None:
        if value is not None:
            if "/" not in value:
                raise ValueError(f"{value!r} needs a prefix length, e.g. {value}/24")
            try:
                ipaddress.ip_interface(value)
            except ValueError as exc:
                raise ValueError(f"not an address with prefix: {exc}") from None
        return value

    @field_validator("gateway")
    @classmethod
    def _router(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_address(value)
        return value

    @field_validator("dns")
    @classmethod
    def _servers(cls, value: list[str]) -> list[str]:
        for server in value:
            ipaddress.ip_address(server)
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.mode == "static" and self.address is None:
            raise ValueError("mode static needs an address (e.g. 192.168.10.20/24)")
        if self.mode == "dhcp" and (self.address or self.gateway or self.dns):
            raise ValueError("address, gateway and dns are for mode: static (DHCP provides them)")
        if self.gateway is not None and self.address is not None:
            net = ipaddress.ip_interface(self.address).network
            if ipaddress.ip_address(self.gateway) not in net:
                raise ValueError(f"gateway {self.gateway} is not in the network of {self.address} ({net})")
        return self


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
