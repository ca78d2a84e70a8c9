"""Commands about the software and the machine: version, system."""
from __future__ import annotations

import contextlib
import platform
import shutil
import socket
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.ops.control.protocol import Reply
from appliance.ops.control.sysinfo import run_quietly
from appliance.ops.control.text import duration, size

SERVICES = ("appliance.service", "appliance-console.service", "appliance-system.service",
            "appliance-grow-data.service")

class SystemCommands:
    def cmd_version(self, args: list[str], who: str) -> Reply:
        data = {"version": __version__, "gateway": self.sup.cfg.gateway.name, "python": platform.python_version(),
                "system": f"{platform.system()} {platform.release()} {platform.machine()}"}
        return Reply(True, [f"appliance {__version__} (gateway {data['gateway']}; Python {data['python']}; "
                            f"{data['system']})"], data)

    def cmd_system(self, args: list[str], who: str) -> Reply:
        """The machine around the appliance, for a service engineer on the serial line."""
        data: dict[str, Any] = {"hostname": socket.gethostname(), "kernel": platform.release()}
        lines = [f"host     {data['hostname']}, Linux {data['kernel']} {platform.machine()}"]
        with contextlib.suppress(OSError, ValueError, IndexError):
            up = float(Path("/proc/uptime").read_text().split()[0])
            load = Path("/proc/loadavg").read_text().split()[:3]
            data.update(uptime_s=up, load=[float(x) for x in load])
            lines.append(f"uptime   {duration(up)}, load {' '.join(load)}")
        with contextlib.suppress(OSError, ValueError):
            mem = {k: int(v.split()[0]) * 1024 for k, v in
                   (line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)}
            data["memory"] = {"total": mem["MemTotal"], "available": mem["MemAvailable"]}
            lines.append(f"memory   {size(mem['MemAvailable'])} available of {size(mem['MemTotal'])}")
        disks = {}
        for label, path in (("root", Path("/")), ("data", self.sup.cfg.gateway.data_dir)):
            with contextlib.suppress(OSError):
                usage = shutil.disk_usage(path)
                disks[label] = {"path": str(path), "total": usage.total, "free": usage.free}
                lines.append(f"disk     {label:<5} {str(path):<18} {size(usage.free)} free of {size(usage.total)}")
        data["disks"] = disks
        addresses = run_quietly(["ip", "-brief", "address", "show", "up"])
        if addresses is not None:
            data["addresses"] = [line.split() for line in addresses.splitlines() if line.strip()]
            lines += [f"address  {' '.join(words)}" for words in data["addresses"] if words[0] != "lo"]
        units = run_quietly(["systemctl", "show", "--property=Id,ActiveState,SubState,NRestarts", *SERVICES])
        if units is not None:
            data["services"] = {}
            for block in units.strip().split("\n\n"):
                props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
                if props.get("Id"):
                    data["services"][props["Id"]] = props
                    lines.append(f"service  {props['Id']:<28} {props.get('ActiveState', '?')}/{props.get('SubState', '?')}"
                                 f", {props.get('NRestarts', '0')} restarts")
        else:
            lines.append("service  (not under systemd here)")
        return Reply(True, lines, data)
