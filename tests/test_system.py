"""`network:` and `appliance system apply`: the gateway's hostname and network from the YAML."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from appliance.config.schema import ConfigError, load_config
from appliance.config.network import NetworkSection
from appliance.ops.system import hostname_for, networkd_unit

from conftest import REPO
from support import sim_source


def config_file(tmp_path, network=None, **extra):
    doc = {"gateway": {"name": "line3_press.2", "data_dir": str(tmp_path / "var")},
           "sources": {"s": sim_source()}, **extra}
    if network is not None:
        doc["network"] = network
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def apply(tmp_path, path):
    out = tmp_path / "networkd"
    proc = subprocess.run([sys.executable, "-m", "appliance", "system", "apply", "--config", str(path),
                           "--networkd-dir", str(out), "--no-hostname"], cwd=REPO, capture_output=True, text=True)
    return proc, (out / "10-appliance.network").read_text()


def test_default_is_dhcp_on_the_wired_interfaces_and_hostname_from_gateway_name(tmp_path):
    proc, unit = apply(tmp_path, config_file(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "Name=en* eth*" in unit and "DHCP=yes" in unit and "Address=" not in unit
    assert "hostname line3-press-2" in proc.stderr


def test_static_network_is_written_as_given(tmp_path):
    net = {"hostname": "press2", "interface": "eth0", "mode": "static", "address": "192.168.10.20/24",
           "gateway": "192.168.10.1", "dns": ["192.168.10.1", "9.9.9.9"], "ntp": ["192.168.10.1"]}
    proc, unit = apply(tmp_path, config_file(tmp_path, net))
    assert proc.returncode == 0, proc.stderr
    assert unit.splitlines()[1:] == ["[Match]", "Name=eth0", "", "[Network]", "Address=192.168.10.20/24",
                                     "Gateway=192.168.10.1", "DNS=192.168.10.1", "DNS=9.9.9.9", "NTP=192.168.10.1"]
    assert "hostname press2; network static 192.168.10.20/24 on eth0" in proc.stderr


@pytest.mark.parametrize("net, message", [
    ({"mode": "static"}, "mode static needs an address"),
    ({"mode": "static", "address": "192.168.10.20"}, "needs a prefix length, e.g. 192.168.10.20/24"),
    ({"mode": "static", "address": "192.168.10.20/24", "gateway": "10.0.0.1"}, "is not in the network of"),
    ({"address": "192.168.10.20/24"}, "are for mode: static"),
    ({"mode": "static", "address": "192.168.10.20/24", "dns": ["nameserver"]}, "does not appear to be an IPv4"),
    ({"hostname": "bad_name"}, "network.hostname"),
    ({"dhcp": True}, "'dhcp' is not a valid option for network"),
])
def test_bad_network_sections_are_config_errors_with_their_line(tmp_path, net, message):
    path = config_file(tmp_path, net)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert message in text, text
    assert text.startswith(f"{path}:"), text


def test_a_broken_config_still_brings_the_network_up(tmp_path):
    # The sources section is wrong, the network section is fine: it is applied, and the exit says error.
    path = config_file(tmp_path, {"mode": "static", "address": "10.1.2.3/16"})
    doc = yaml.safe_load(path.read_text())
    doc["sources"]["s"]["sample_rat"] = 5
    path.write_text(yaml.safe_dump(doc))
    proc, unit = apply(tmp_path, path)
    assert proc.returncode == 2
    assert "Did you mean 'sample_rate'?" in proc.stderr and "the network comes up anyway" in proc.stderr
    assert "Address=10.1.2.3/16" in unit
    # Not even the network section is valid: DHCP.
    path.write_text("network: {mode: static}\nsources: [\n")
    proc, unit = apply(tmp_path, path)
    assert proc.returncode == 2 and "DHCP=yes" in unit and "using DHCP" in proc.stderr


def test_hostname_derivation():
    assert hostname_for(NetworkSection(), "gw_01.hall-a") == "gw-01-hall-a"
    assert hostname_for(NetworkSection(hostname="x1"), "whatever") == "x1"
    assert "DHCP=yes" in networkd_unit(NetworkSection())
