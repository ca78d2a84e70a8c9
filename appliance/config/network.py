"""`network:` in the YAML: the gateway's hostname and wired network (applied by appliance/ops/system.py)."""
from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, field_validator, model_validator

from hal.schema import StrictModel

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
