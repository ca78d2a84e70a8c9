"""`appliance fleet status | deploy | rollback | command` (docs/fleet.md)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _operator(args):
    from appliance_tools.fleet.operator import FleetOperator
    key = None
    if args.key:
        from appliance.deploy.keys import KeyFileError, load_private
        try:
            key = load_private(Path(args.key))
        except KeyFileError as exc:
            sys.exit(f"appliance fleet: {exc}")
    password = None
    if args.password_file:
        try:
            password = Path(args.password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            sys.exit(f"appliance fleet: cannot read --password-file {args.password_file}: {exc.strerror or exc}")
    try:
        return FleetOperator(args.broker, args.prefix, key=key, protocol=args.protocol, username=args.username,
                             password=password)
    except ConnectionError as exc:
        sys.exit(f"appliance fleet: {exc}")


def cmd_status(args) -> int:
    from appliance_tools.fleet.operator import status_table
    op = _operator(args)
    try:
        reports = op.gateways(args.group, settle_s=args.wait)
    finally:
        op.close()
    print(json.dumps(reports, indent=1, sort_keys=True) if args.json else status_table(reports))
    return 0


def cmd_deploy(args) -> int:
    from appliance_tools.fleet.operator import rollout
    op = _operator(args)
    try:
        result = rollout(op, Path(args.bundle), args.group, canary=args.canary, batch_pct=args.batch,
                         max_failures=args.max_failures, timeout_s=args.timeout)
    finally:
        op.close()
    print(result.table())
    return 1 if result.halted else 0


def cmd_rollback(args) -> int:
    from appliance_tools.fleet.operator import roll_back
    op = _operator(args)
    try:
        revision = roll_back(op, args.group, args.module, args.to)
    finally:
        op.close()
    print(f"group {args.group}: {args.module} {args.to} (revision {revision}); `appliance fleet status` shows "
          "the gateways converging")
    return 0


def cmd_command(args) -> int:
    from appliance_tools.fleet.operator import CommandFailed
    op = _operator(args)
    try:
        started = time.monotonic()
        reply = op.command(args.gateway, args.op, ident=args.id, timeout_s=args.timeout)
        took = time.monotonic() - started
    except CommandFailed as exc:
        sys.exit(f"appliance fleet: {exc}")
    finally:
        op.close()
    print(json.dumps(reply, indent=1, sort_keys=True))
    print(f"{args.gateway}: reply in {took * 1000:.0f} ms by the {reply['route']} (MQTT {op.protocol})",
          file=sys.stderr)
    return 0 if reply.get("ok") else 1


def add_parser(sub) -> None:
    fleet = sub.add_parser("fleet", help="the operator's fleet: status, staged deploys, rollback (docs/fleet.md)")
    fleet.add_argument("--broker", action="append", required=True, metavar="HOST:PORT",
                       help="an MQTT node of the fleet's broker (repeat for the others)")
    fleet.add_argument("--prefix", default="factory", help="the gateways' uplink.mqtt.topic_prefix")
    fleet.add_argument("--key", help="the operator's private key: desired states go out signed (gateways with "
                       "fleet.operator_keys take no others)")
    fleet.add_argument("--username", help="the operator's MQTT user (docs/fleet.md: ACLs)")
    fleet.add_argument("--password-file", help="file holding that user's password (one line)")
    fleet.add_argument("--protocol", choices=["auto", "5", "3.1.1"], default="auto",
                       help="MQTT version (auto: 5 where the broker speaks it)")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True)
    s = fsub.add_parser("status", help="a table of gateways, their versions and health")
    s.add_argument("--group")
    s.add_argument("--json", action="store_true")
    s.add_argument("--wait", type=float, default=2.0, help="seconds to collect the retained reports")
    s.set_defaults(func=cmd_status)
    d = fsub.add_parser("deploy", help="roll a signed bundle out to a group: canary, then batches")
    d.add_argument("bundle")
    d.add_argument("--group", required=True)
    d.add_argument("--canary", type=int, default=1, help="gateways in the first stage")
    d.add_argument("--batch", type=float, default=25.0, help="percent of the group per later stage")
    d.add_argument("--max-failures", type=int, default=0, help="more than this many failures halt and revert")
    d.add_argument("--timeout", type=float, default=300.0, help="seconds a gateway has to keep the new version")
    d.set_defaults(func=cmd_deploy)
    r = fsub.add_parser("rollback", help="a group back to an earlier version (on the cards) or to `config`")
    r.add_argument("--group", required=True)
    r.add_argument("--module", required=True)
    r.add_argument("--to", required=True, help="a version, or config for the YAML's own file")
    r.set_defaults(func=cmd_rollback)
    c = fsub.add_parser("command", help="send one command to a gateway and print its reply (ops: report)")
    c.add_argument("gateway")
    c.add_argument("op", help="report: the gateway publishes its reported state now")
    c.add_argument("--id", help="the command's id (default: a new one); the same id again gets the same reply "
                   "and is not run twice")
    c.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the reply")
    c.set_defaults(func=cmd_command)
