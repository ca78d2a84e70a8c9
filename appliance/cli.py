"""The `appliance` command."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from appliance import __version__

from appliance.ops import systemd

REPO = Path(__file__).resolve().parents[1]


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("pymodbus").setLevel(logging.WARNING)   # its INFO lines say nothing to an operator


def _load(path: str, check_modules: bool = False, base_dir: Path | None = None):
    """The validated config, or None after printing every problem with its file:line.
    check_modules: also let each module judge its params (a throwaway worker per module)."""
    from appliance.config.schema import ConfigError, load_config_document
    try:
        doc, cfg = load_config_document(path, base_dir)
        if check_modules:
            from appliance.runtime.modcheck import check_modules as judge
            issues = judge(doc, cfg)
            if issues:
                raise ConfigError(issues)
        return cfg
    except ConfigError as exc:
        print(f"{len(exc.issues)} error{'s' if len(exc.issues) != 1 else ''} in {path}:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return None


def cmd_validate(args) -> int:
    cfg = _load(args.config, check_modules=True)
    if cfg is None:
        return 2
    print(f"{args.config}: ok ({len(cfg.sources)} sources, {len(cfg.modules)} modules)")
    return 0


def cmd_run(args) -> int:
    from appliance.core import malloc
    malloc.tune_for_a_long_running_service()   # before any thread starts: flat memory for months
    _setup_logging(args.log_level)
    cfg = _load(args.config, check_modules=True)
    if cfg is None:
        return 2
    card, running = Path(args.config), Path(args.config)
    from appliance.deploy.configs import ConfigStore
    chosen = ConfigStore(cfg.gateway.data_dir / "config", card).choose()
    if chosen != card:   # a config the fleet delivered, still over this card's YAML
        delivered = _load(str(chosen), check_modules=True, base_dir=card.resolve().parent)
        if delivered is not None:
            cfg, running = delivered, chosen
            logging.getLogger("appliance").warning("config: running %s, delivered by the fleet over %s", chosen,
                                                   card)
    from appliance.core.supervisor import Supervisor
    log = logging.getLogger("appliance")
    try:
        # Problems only opening things reveals (a recording's contents, the data directory).
        sup = Supervisor(cfg)
    except (OSError, ValueError, RuntimeError) as exc:
        log.error("cannot start with %s: %s", args.config, exc)
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sup.request_stop())
    sup.use_config_files(card, running)

    def reload_on_hup(*_):
        # Not in the handler itself: a reload starts and stops threads and processes.
        def run():
            from appliance.config.schema import ConfigError
            try:
                sup.reload_config()
            except ConfigError as exc:
                log.error("config reload refused, still running the previous config:\n  %s",
                          "\n  ".join(str(i) for i in exc.issues))
            except Exception:
                log.exception("config reload failed")
        threading.Thread(target=run, name="reload", daemon=True).start()

    signal.signal(signal.SIGHUP, reload_on_hup)
    try:
        sup.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        sup.stop()
        return 1
    log.info("appliance %s running gateway %s (config %s); Ctrl-C stops", __version__, cfg.gateway.name,
             running)
    watchdog = systemd.Watchdog(sup.hang_problems)
    systemd.notify("READY=1", f"STATUS=running gateway {cfg.gateway.name}: {len(sup.sources)} sources, "
                              f"{len(sup.modules)} modules")
    started = time.monotonic()
    try:
        if args.until_end:
            sup.wait_until_done()
        else:
            while not sup.stopping:
                if args.duration and time.monotonic() - started > args.duration:
                    break
                watchdog.tick()
                time.sleep(0.2)
    finally:
        systemd.notify("STOPPING=1")
        status = sup.status()
        sup.stop()
    log.info("stopped; %d events emitted", status["events_emitted"])
    if args.status_json:
        Path(args.status_json).write_text(json.dumps(status, indent=2))
    return 0


TOOLS_MISSING = ("the workstation tools (tools/, package factory-gateway-tools) are not installed here: a gateway "
                 "runs modules, it does not build them. On a workstation `make` installs them (pip install -e tools).")


def _tools(module: str):
    """A module of appliance_tools, or a clear exit where only the gateway is installed."""
    import importlib
    try:
        return importlib.import_module(f"appliance_tools.{module}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("appliance_tools", "onnx", "ziglang"):
            sys.exit(f"appliance: {TOOLS_MISSING}")
        raise


def cmd_module_build(args) -> int:
    modbuild = _tools("modbuild")
    BuildError, build_all, build_module = modbuild.BuildError, modbuild.build_all, modbuild.build_module
    try:
        if args.src:
            if args.output and len(args.src) != 1:
                print("-o works with one module only", file=sys.stderr)
                return 2
            results = []
            for src in args.src:
                src = Path(src)
                out = Path(args.output) if args.output else REPO / "modules" / "build" / f"{src.stem}.wasm"
                results.append(build_module(src, out))
        else:
            results = build_all(simd=True)   # X.wasm for every engine, X.simd.wasm for wasmtime
    except BuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    bad = 0
    for r in results:
        status = "ok" if not r.problems else "PROBLEMS: " + "; ".join(r.problems)
        print(f"{r.out}  {r.size} bytes  sha256 {r.sha256[:16]}  {status}")
        bad += bool(r.problems)
    return 1 if bad else 0


def cmd_module_inspect(args) -> int:
    from appliance.runtime.inspect import inspect_text
    try:
        print(inspect_text(Path(args.wasm)))
    except OSError as exc:
        print(f"{args.wasm}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def cmd_system_apply(args) -> int:
    """Hostname and network from the YAML, at boot. A YAML with errors still gets the gateway on
    the network: its network section if that alone is valid, else DHCP."""
    _setup_logging(args.log_level)
    from appliance.config.network import NetworkSection
    from appliance.ops import system
    from appliance.config.schema import ConfigError, load_config_document
    from appliance.config.yamlsource import YamlError, load_yaml
    log = logging.getLogger("appliance.system")
    network, name, rc = NetworkSection(), "gateway", 0
    try:
        cfg = load_config_document(args.config)[1]
        network, name = cfg.network, cfg.gateway.name
    except ConfigError as exc:
        rc = 2
        log.error("%s has errors; the network comes up anyway:\n  %s", args.config,
                  "\n  ".join(str(i) for i in exc.issues))
        try:
            data = load_yaml(args.config).data or {}
            network = NetworkSection.model_validate(data.get("network") or {})
            log.warning("using its network section as written")
        except (YamlError, ValueError, AttributeError):
            log.warning("using DHCP on the wired interfaces")
    done = system.apply(network, name, networkd_dir=Path(args.networkd_dir), set_hostname=not args.no_hostname)
    log.info("%s", done)
    return rc


def cmd_events(args) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 2
    from appliance.events.spool import Spool
    spool = Spool(cfg.gateway.data_dir / "spool.db", cfg.events.spool_max_mb << 20)
    for event in spool.tail(args.tail):
        print(json.dumps(event, indent=2) if args.full else
              f"{event['time']} {event['severity']:<8} {event['source']}/{event['module']}: {event['message']}"
              f" [{event['id']}]")
        for meta in event.get("attachments", []) if args.save_attachments else []:
            out = Path(args.save_attachments) / f"{event['id']}-{Path(meta['name']).name}"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(spool.attachment(event["id"], meta["name"]) or b"")
            print(f"    {meta['name']} ({meta['size']} bytes) -> {out}")
    spool.close()
    return 0


def cmd_baseline_reset(args) -> int:
    """Ask for a fresh baseline: a running appliance restarts the module within a second and
    it learns again; a stopped one does so at its next start."""
    cfg = _load(args.config)
    if cfg is None:
        return 2
    if args.module not in cfg.modules:
        print(f"no module {args.module!r} in {args.config} (modules: {', '.join(cfg.modules) or 'none'})",
              file=sys.stderr)
        return 2
    state_dir = cfg.gateway.data_dir / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / f"{args.module}.reset").touch()
    had = (state_dir / f"{args.module}.state").exists()
    print(f"baseline reset requested for {args.module}"
          f"{'' if had else ' (it has no saved baseline yet)'}; it learns afresh")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["console"]:   # its options (--device, --stdio) are its own
        from appliance.ops.console import console_main
        return console_main(argv[1:])
    from appliance.config.schema import DEFAULT_CONFIG
    p = argparse.ArgumentParser(prog="appliance", description="Factory gateway: sensors -> wasm analytics -> events")
    p.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the appliance")
    run.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--until-end", action="store_true", help="exit when every (replay) source has ended "
                     "and every module has processed its windows")
    run.add_argument("--duration", type=float, default=0, help="stop after this many seconds")
    run.add_argument("--status-json", help="write the final status to this file")
    run.set_defaults(func=cmd_run)

    val = sub.add_parser("validate", help="check a config file; starts nothing")
    val.add_argument("config")
    val.set_defaults(func=cmd_validate)

    mod = sub.add_parser("module", help="build, inspect, bundle and sign wasm modules")
    msub = mod.add_subparsers(dest="module_command", required=True)
    b = msub.add_parser("build", help="build modules from C (default: every module in modules/src)")
    b.add_argument("src", nargs="*", help="module directory (with module.yaml) or .c file")
    b.add_argument("-o", "--output", help="output .wasm (one module only)")
    b.set_defaults(func=cmd_module_build)
    i = msub.add_parser("inspect", help="show a module's ABI, memory, imports and exports")
    i.add_argument("wasm")
    i.set_defaults(func=cmd_module_inspect)
    from appliance.deploy.cli import add_parsers as add_deploy_parsers
    add_deploy_parsers(msub, sub)   # module bundle|sign|verify, keys new

    ev = sub.add_parser("events", help="show events in the local spool")
    ev.add_argument("--config", default=str(DEFAULT_CONFIG))
    ev.add_argument("--tail", type=int, default=20)
    ev.add_argument("--full", action="store_true", help="whole JSON records")
    ev.add_argument("--save-attachments", metavar="DIR", help="write each event's evidence (snapshots) there")
    ev.set_defaults(func=cmd_events)

    try:
        from appliance_tools.nn.cli import add_parser as add_model_parser
        add_model_parser(sub)
    except ModuleNotFoundError:   # a gateway: say so when asked
        model = sub.add_parser("model", help="compile ONNX models into modules (workstation tools)")
        model.add_argument("rest", nargs=argparse.REMAINDER)
        model.set_defaults(func=lambda a: sys.exit(f"appliance model: {TOOLS_MISSING}"))

    try:
        from appliance_tools.fleet.cli import add_parser as add_fleet_parser
        add_fleet_parser(sub)
    except ModuleNotFoundError:   # a gateway: the fleet is run from an operator's machine
        fleet = sub.add_parser("fleet", help="the operator's fleet tools (workstation tools)")
        fleet.add_argument("rest", nargs=argparse.REMAINDER)
        fleet.set_defaults(func=lambda a: sys.exit(f"appliance fleet: {TOOLS_MISSING}"))

    sub.add_parser("console", help="the service console on a serial line or stdio (appliance console --help)")
    base = sub.add_parser("baseline", help="learned baselines of modules")
    bsub = base.add_subparsers(dest="baseline_command", required=True)
    reset = bsub.add_parser("reset", help="discard a module's learned baseline; it learns afresh")
    reset.add_argument("module")
    reset.add_argument("--config", default=str(DEFAULT_CONFIG))
    reset.set_defaults(func=cmd_baseline_reset)

    sysp = sub.add_parser("system", help="the gateway's hostname and network from the YAML (run at boot)")
    ssub = sysp.add_subparsers(dest="system_cmd", required=True)
    apply_p = ssub.add_parser("apply", help="set the hostname, write the systemd-networkd unit")
    apply_p.add_argument("--config", default=str(DEFAULT_CONFIG))
    apply_p.add_argument("--networkd-dir", default="/run/systemd/network", help="where the .network file goes")
    apply_p.add_argument("--no-hostname", action="store_true", help="do not set the kernel hostname")
    apply_p.add_argument("--log-level", default="info")
    apply_p.set_defaults(func=cmd_system_apply)
    ev2 = sub.add_parser("eval", help="evaluate modules on recorded data")
    evaluations = {"bearing": "appliance_tools.evaluation.bearing:main", "motion": "appliance_tools.evaluation.motion:main",
                   "nn-bearing": "appliance_tools.evaluation.nn:bearing_main",
                   "nn-camera": "appliance_tools.evaluation.nn:camera_main"}
    ev2.add_argument("what", choices=sorted(evaluations),
                     help="bearing: the bearing module on the CWRU recordings; motion: the motion module on "
                          "vtest.avi against OpenCV's MOG2; nn-bearing, nn-camera: the trained models in "
                          "modules/models on their held-out data")
    ev2.add_argument("rest", nargs=argparse.REMAINDER, help="options of that evaluation (--help)")
    ev2.set_defaults(func=lambda a: getattr(_tools(evaluations[a.what].split(":")[0].removeprefix("appliance_tools.")),
                                            evaluations[a.what].split(":")[1])(a.rest))

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
