"""The appliance's configuration: typed models, loaded from YAML with errors that say file:line.

Each source type owns its schema (in hal/); this module composes them, adds the appliance's own
sections, and turns every validation problem into one line a plant engineer can act on:

    configs/line3.yaml:14:5: sources.spindle.sample_rat: 'sample_rat' is not a valid option
    for sources.spindle (sim_vibration). Did you mean 'sample_rate'?
"""
from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic.functional_validators import AfterValidator, WrapValidator
from pydantic import BaseModel, Field, StringConstraints, ValidationError, field_validator, model_validator

from appliance.config.console import ConsoleSection
from appliance.config.network import NetworkSection
from appliance.uplink.http import HttpConfig
from appliance.uplink.mqtt import MqttConfig
from appliance.config.yamlsource import Mark, YamlDocument, YamlError, load_yaml
from hal.registry import SOURCE_TYPES, load_builtin_sources
from hal.schema import ConfigPath, StrictModel, path_exists, resolve_config_path

load_builtin_sources()

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "appliance.yaml"

# Names become metric labels, topic segments and file names: keep them plain.
Name = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,47}$")]

SourceSection = Annotated[
    Union[tuple(model for _, model in SOURCE_TYPES.values())],  # type: ignore[valid-type]
    Field(discriminator="type"),
]


class GatewaySection(StrictModel):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")] = Field(
        "gateway", description="this gateway's name in events and upstream topics")
    data_dir: ConfigPath = Field(Path("/var/lib/appliance"), description="spool and state (the data partition)")


class MetricsSection(StrictModel):
    enabled: bool = Field(True, description="serve /metrics")
    listen: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 for every interface")
    port: int = Field(9108, ge=0, le=65535, description="0 picks a free port (tests)")


class RestartPolicy(StrictModel):
    backoff_s: float = Field(0.5, gt=0, le=3600, description="delay before the first restart; doubles per fault")
    backoff_max_s: float = Field(30.0, gt=0, le=86400, description="longest restart delay")
    max_faults: int = Field(5, ge=1, le=1000, description="faults within fault_window_s that quarantine a module")
    fault_window_s: float = Field(300.0, gt=0, description="window over which faults are counted")

    @model_validator(mode="after")
    def _ordered(self):
        if self.backoff_max_s < self.backoff_s:
            raise ValueError(f"backoff_max_s ({self.backoff_max_s}) is less than backoff_s ({self.backoff_s})")
        return self


class RuntimeSection(StrictModel):
    backend: Literal["wasm3", "wasmtime"] = Field("wasm3", description="wasm engine of the modules that do not set "
                                                  "their own `engine` (docs/engines.md)")
    max_memory_mb: int = Field(64, ge=1, le=1024, description="largest linear memory a module may declare")
    stack_kb: int = Field(128, ge=16, le=512, description="wasm3 stack per module (about 1 MB crashes wasm3); "
                          "wasmtime's is this or 512 KiB, whichever is larger")
    worker_memory_mb: int = Field(256, ge=64, le=4096,
                                  description="memory each worker may add (RLIMIT_DATA) to its own footprint after "
                                              "its libraries load, besides the module's max_memory_mb")
    restart: RestartPolicy = Field(RestartPolicy(), description="restart and quarantine policy for every module")
    modules_dir: ConfigPath | None = Field(None, description="where the console's `modules load` may take a "
                                           "module from (nowhere else); none: the folders the configured "
                                           "modules are in")
    zygote: Path | None = Field(None, description="unix socket of a zygote run as a service of its own (the "
                                "image's appliance-zygote.service, docs/sandbox.md); none: that service's socket "
                                "(/run/appliance-zygote/zygote.sock) if it exists, else the appliance starts its own")

    @property
    def worker_budget_bytes(self) -> int:
        return (self.worker_memory_mb + self.max_memory_mb) << 20


class WindowSection(StrictModel):
    size: int = Field(ge=1, le=1 << 20, description="frames per window (at least 16 for samples; 1 for cameras)")
    hop: int | None = Field(None, ge=1, le=1 << 22, description="frames between window starts (default: size)")
    overlap: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of overlap, instead of hop")

    @model_validator(mode="after")
    def _one_of(self):
        if self.hop is not None and self.overlap is not None:
            raise ValueError("give either hop or overlap, not both")
        return self

    @property
    def hop_frames(self) -> int:
        if self.hop is not None:
            return self.hop
        if self.overlap is not None:
            return max(1, round(self.size * (1.0 - self.overlap)))
        return self.size


MAX_PARAMS_BYTES = 4096   # the SDK's default params buffer (AP_PARAMS_BYTES)


def _module_file(path: Path) -> Path:
    if not path_exists(path):
        hint = " (run `make modules` to build the bundled modules)" if "modules/build" in path.as_posix() else ""
        raise ValueError(f"module file not found: {path}{hint}")
    if path.suffix != ".wasm":
        raise ValueError(f"{path} is not a .wasm file")
    return path


ModuleFile = Annotated[Path, WrapValidator(resolve_config_path), AfterValidator(_module_file)]


class ModuleSection(StrictModel):
    wasm: ModuleFile = Field(description="the module binary (.wasm, ABI v1)")
    source: Name = Field(description="name of the source whose windows it gets")
    channels: list[str] | None = Field(None, min_length=1, description="subset of the source's channels")
    window: WindowSection | None = Field(None, description="how the stream is cut into windows (required for "
                                         "sample sources; for cameras each frame is a window and `hop` "
                                         "takes every n-th frame)")
    deadline_ms: float = Field(250.0, gt=0, le=60000, description="longest a window may take; then the worker is "
                               "killed (wasm3), or wasmtime stops the call and the worker goes on with a fresh "
                               "instance; either way a `deadline` fault")
    engine: Literal["wasm3", "wasmtime"] | None = Field(
        None, description="wasm3 (interpreter) or wasmtime (compiled, near-native; docs/engines.md); none: "
        "runtime.backend")
    simd: bool = Field(True, description="wasmtime: run X.simd.wasm, the module's SIMD128 build, when it lies "
                       "beside X.wasm; false: always X.wasm (wasm3 never runs a SIMD build)")
    fuel: int | None = Field(None, ge=1, le=1 << 62, description="wasmtime: wasm instructions (roughly) a call "
                             "may execute; beyond that it is stopped like a missed deadline. None: no fuel "
                             "counted (it costs some speed)")
    queue: int = Field(4, ge=1, le=1024, description="windows that may wait; beyond that the oldest is dropped")
    overflow: Literal["drop_oldest", "block"] = Field(
        "drop_oldest", description="full queue: drop the oldest window, or (replay with realtime: false only) wait")
    params: dict[str, Any] = Field({}, description="passed to the module's ap_init (modules/ABI.md, Params)")
    host_dsp: bool = Field(True, description="offer the host's native DSP kernels (ap.dsp_*) to the module; "
                           "false makes it use its own wasm code")
    host_nn: bool = Field(False, description="let a compiled model run natively (ap.nn_run, docs/models.md): "
                          "its library next to the .wasm, verified against the hash the module carries; "
                          "false: the module's own wasm code")
    enabled: bool = Field(True, description="false: configured but not run")
    restart: RestartPolicy | None = Field(None, description="overrides runtime.restart for this module")

    @field_validator("params")
    @classmethod
    def _params_are_plain(cls, value: dict[str, Any]) -> dict[str, Any]:
        text = params_text(value)   # raises with the offending key
        for key in value:
            if key == "host" or (isinstance(key, str) and key.startswith("host.")):
                raise ValueError(f"param {key!r}: 'host' and 'host.*' are reserved: the appliance sets them "
                                 "itself from host_dsp and host_nn (ABI.md, Params)")
        size = len(text.encode())
        if size > MAX_PARAMS_BYTES:
            raise ValueError(f"params take {size} bytes as text; modules accept at most {MAX_PARAMS_BYTES}")
        return value


class EventsSection(StrictModel):
    log: bool = Field(True, description="log each event as it is committed")
    attach_window: bool = Field(True, description="attach the triggering window's samples (window.npy) as evidence")
    attachment_max_kb: int = Field(256, ge=1, le=16384, description="size limit of one attachment")
    spool_max_mb: int = Field(64, ge=1, le=100_000, description="spool bound; then the oldest lowest-severity event goes")
    spool_max_age_h: float = Field(720.0, gt=0, description="events older than this leave the spool (counted, logged); "
                                   "ages count running time, and wall time only once NTP has set the clock")
    spool_durability: Literal["full", "off"] = Field("full", description="`off` is for the image rig's power-cut "
                                                     "drill only (it proves the drill sees losses): refused unless "
                                                     "the kernel command line has appliance.testrig")
    module_rate_per_min: float = Field(60.0, gt=0, le=60_000, description="events a module may raise per minute "
                                       "once its burst is spent; the rest are held back and counted")
    module_burst: int = Field(20, ge=1, le=10_000, description="events a module may raise at once")
    suppressed_summary_s: float = Field(60.0, ge=1, le=86_400, description="at most one event per interval says "
                                        "how many events a module had held back")


class UplinkSection(StrictModel):
    transport: Literal["none", "mqtt", "http"] = Field("none", description="where events go upstream")
    mqtt: MqttConfig | None = Field(None, description="with transport: mqtt (docs/uplink-mqtt.md)")
    http: HttpConfig | None = Field(None, description="with transport: http (docs/uplink-http.md)")
    backoff_s: float = Field(1.0, gt=0, le=3600, description="first retry delay after a failure; doubles")
    backoff_max_s: float = Field(60.0, gt=0, le=86400, description="longest retry delay")
    batch: int = Field(50, ge=1, le=10_000, description="events taken from the spool per round")
    health_interval_s: float = Field(60.0, ge=5, le=86400, description="how often a health summary goes up")

    @model_validator(mode="after")
    def _section_for_transport(self):
        if self.transport != "none" and getattr(self, self.transport) is None:
            raise ValueError(f"transport: {self.transport} needs an '{self.transport}:' section")
        return self


def _public_key_line(line: str) -> str:
    from appliance.deploy.keys import parse_public
    parse_public(line)   # raises with what is wrong
    return line.strip()


class DeploySection(StrictModel):
    trusted_keys: list[Annotated[str, AfterValidator(_public_key_line)]] = Field(
        [], description="public keys whose signed module bundles this gateway runs, each as `appliance keys new` "
                        "writes it (`ed25519:<base64> name`)")
    allow_unsigned: bool = Field(False, description="run unsigned module bundles, and bundles signed by keys not "
                                 "in trusted_keys (development only: the console and the metrics say so)")
    probation_windows: int = Field(20, ge=1, le=1_000_000, description="windows a new module version must process "
                                   "without a fault or a missed deadline before it is kept; a fault before that "
                                   "rolls back to the previous version")
    store_dir: ConfigPath | None = Field(None, description="where deployed versions live (<store>/<module>/<version>/); "
                                         "none: <gateway.data_dir>/modules")
    config_probation_s: float = Field(60.0, gt=0, le=3600, description="a config delivered by the fleet is kept "
                                      "once every source delivers and every module runs within this time; else "
                                      "the previous config is applied again")


class FleetSection(StrictModel):
    enabled: bool = Field(False, description="take desired states from the fleet channel and report this "
                          "gateway's state there (docs/fleet.md); needs uplink.transport: mqtt")
    groups: list[Name] = Field([], description="the groups this gateway belongs to; a later group wins per module, "
                               "and the gateway's own desired state wins over every group")
    operator_keys: list[Annotated[str, AfterValidator(_public_key_line)]] = Field(
        [], description="public keys of the operators (`appliance keys new`): when set, a desired state must be "
                        "signed by one of them (`appliance fleet --key`), else it is refused; empty: the broker's "
                        "ACLs alone decide who may publish desired states")


class AppConfig(StrictModel):
    gateway: GatewaySection = GatewaySection()
    metrics: MetricsSection = MetricsSection()
    runtime: RuntimeSection = RuntimeSection()
    events: EventsSection = EventsSection()
    uplink: UplinkSection = UplinkSection()
    console: ConsoleSection = ConsoleSection()
    network: NetworkSection = NetworkSection()
    deploy: DeploySection = DeploySection()
    fleet: FleetSection = FleetSection()
    sources: dict[Name, SourceSection] = Field(min_length=1)
    modules: dict[Name, ModuleSection] = {}

    @model_validator(mode="after")
    def _fleet_needs_mqtt(self):
        if self.fleet.enabled and self.uplink.transport != "mqtt":
            raise ValueError(f"fleet.enabled needs uplink.transport: mqtt (the fleet channel is the uplink's MQTT "
                             f"connection); it is {self.uplink.transport!r}")
        return self


def flatten_params(params: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """YAML params -> sorted (key, text) pairs, the form modules receive (ABI.md, Params)."""
    out: list[tuple[str, str]] = []
    for key, value in params.items():
        if not isinstance(key, str) or not key or any(c in key for c in "=\n"):
            raise ValueError(f"param name {key!r} must be a non-empty string without '=' or newlines")
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(flatten_params(value, name + "."))
        elif isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            # A list of points (a polygon: [[x, y], ...]) becomes "x1,y1;x2,y2;...".
            if not all(v and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in v) for v in value):
                raise ValueError(f"param {name}: a list of lists must hold numbers only (points such as [x, y])")
            out.append((name, ";".join(",".join(_param_text(c) for c in v) for v in value)))
        elif isinstance(value, list):
            if not all(isinstance(v, (bool, int, float, str)) for v in value):
                raise ValueError(f"param {name}: lists may hold only numbers, strings and booleans, "
                                 f"or lists of numbers (points)")
            out.append((name, ",".join(_param_text(v) for v in value)))
        elif isinstance(value, (bool, int, float, str)):
            out.append((name, _param_text(value)))
        else:
            raise ValueError(f"param {name}: {value!r} is not a number, string, boolean, list or mapping")
    for name, text in out:
        if "\n" in text:
            raise ValueError(f"param {name}: values may not contain newlines")
    return sorted(out)


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return repr(value) if isinstance(value, float) else str(value)


def params_text(params: dict[str, Any]) -> str:
    return "".join(f"{k}={v}\n" for k, v in flatten_params(params))


def module_params_text(module: "ModuleSection") -> str:
    """What ap_init receives: the YAML params plus the host.* params the appliance sets
    (host.features: ap.features is always there, whatever host_dsp says; ABI.md)."""
    return params_text({**module.params, "host": {"dsp": 1 if module.host_dsp else 0,
                                                  "features": 1,
                                                  "nn": 1 if module.host_nn else 0}})


# ---- errors -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigIssue:
    file: Path
    mark: Mark
    path: tuple
    message: str

    def __str__(self) -> str:
        where = ".".join(str(p) for p in self.path)
        return f"{self.file}:{self.mark.line}:{self.mark.column}: {where + ': ' if where else ''}{self.message}"


class ConfigError(Exception):
    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = sorted(issues, key=lambda i: (i.mark.line, i.mark.column))
        super().__init__("\n".join(str(i) for i in self.issues))


def _section_name(path: tuple, data: Any) -> str:
    where = ".".join(str(p) for p in path) or "the top level"
    if isinstance(data, dict) and isinstance(data.get("type"), str):
        return f"{where} ({data['type']})"
    return where


def _model_at(path: tuple, root_data: Any) -> type[BaseModel] | None:
    """The model class that validates the mapping at `path`, following the data through
    dicts, lists, optionals and the `type:`-tagged source union."""
    tp: Any = AppConfig
    data = root_data
    for step in path:
        tp = _unwrap(tp, data)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(step) if isinstance(step, str) else None
            if field is None:
                return None
            tp = field.annotation
        elif typing.get_origin(tp) in (dict, list):
            tp = typing.get_args(tp)[-1]
        else:
            return None
        data = data[step] if isinstance(data, (dict, list)) and _has(data, step) else None
    tp = _unwrap(tp, data)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _has(container: Any, step: Any) -> bool:
    if isinstance(container, dict):
        return step in container
    return isinstance(step, int) and 0 <= step < len(container)


def _unwrap(tp: Any, data: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            tag = data.get("type") if isinstance(data, dict) else None
            chosen = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)
                      and "type" in m.model_fields and tag in typing.get_args(m.model_fields["type"].annotation)]
            tp = chosen[0] if chosen else members[0]
        else:
            return tp


def _data_path(loc: tuple, data: Any) -> tuple[tuple, bool]:
    """Pydantic's loc -> a path in the YAML data. Pydantic inserts the union tag and markers
    such as '[key]' that are not in the document; skip them. Returns (path, is_dict_key)."""
    path: list = []
    node = data
    is_key = False
    for step in loc:
        if step == "[key]":
            is_key = True
            continue
        if isinstance(node, dict) and step not in node and isinstance(step, str):
            # pydantic renders a non-string key (null, 3, true) as text in loc
            step = next((k for k in node if not isinstance(k, str) and str(k) == step), step)
        if isinstance(node, dict) and step in node:
            path.append(step)
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            path.append(step)
            node = node[step]
        elif isinstance(node, dict) and node.get("type") == step:
            continue  # the discriminator tag pydantic adds to loc
        elif isinstance(step, str) and step.startswith("function-"):
            continue
        else:
            path.append(step)
            node = None
    return tuple(path), is_key


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def issue_from_pydantic(doc: YamlDocument, err: dict) -> ConfigIssue:
    path, is_key = _data_path(err["loc"], doc.data)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, key = path[:-1], path[-1]
        parent_data = _get(doc.data, parent)
        model = _model_at(parent, doc.data)
        message = f"{key!r} is not a valid option for {_section_name(parent, parent_data)}"
        if model is not None:
            options = sorted(model.model_fields)
            near = difflib.get_close_matches(str(key), options, n=1, cutoff=0.6)
            message += f". Did you mean {near[0]!r}?" if near else f". Valid options: {', '.join(options)}"
        return ConfigIssue(doc.path, doc.mark_for(path, key=True), path, message)
    if kind == "missing":
        parent_data = _get(doc.data, path[:-1])
        return ConfigIssue(doc.path, doc.mark_for(path[:-1], key=True) if path[:-1] else Mark(1, 1), path,
                           f"required option {path[-1]!r} is missing from {_section_name(path[:-1], parent_data)}")
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        tag = ctx.get("tag")
        expected = sorted(SOURCE_TYPES)
        near = difflib.get_close_matches(str(tag), expected, n=1, cutoff=0.5)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        return ConfigIssue(doc.path, doc.mark_for(path + ("type",)), path + ("type",),
                           f"{tag!r} is not a known source type (known: {', '.join(expected)}).{hint}")
    if kind == "union_tag_not_found":
        return ConfigIssue(doc.path, doc.mark_for(path, key=True), path,
                           f"a source needs 'type:' (one of: {', '.join(sorted(SOURCE_TYPES))})")
    if kind == "invalid_key":
        return ConfigIssue(doc.path, doc.mark_for(path, key=True), path,
                           f"the key {path[-1]!r} is not text: option names are strings (quote it if you must)")
    if is_key:
        if kind == "string_pattern_mismatch":
            reason = "names are lower-case letters, digits and '_', starting with a letter, at most 48 characters"
        else:
            reason = err["msg"]
        return ConfigIssue(doc.path, doc.mark_for(path, key=True), path,
                           f"the name {path[-1]!r} is invalid: {reason}")
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    value = err.get("input")
    if value is None and kind in ("model_type", "dict_type", "list_type"):
        message = f"is empty, but needs a {'list' if kind == 'list_type' else 'mapping'} of options"
    elif kind not in ("model_type", "dict_type") and not isinstance(value, (dict, list)):
        message = f"{_describe(value)} is invalid: {message}"
    # A rule about a whole section points at the section's key line, not its first entry.
    section = isinstance(_get(doc.data, path), (dict, list)) and bool(path)
    return ConfigIssue(doc.path, doc.mark_for(path, key=section), path, message)


def _get(data: Any, path: tuple) -> Any:
    for step in path:
        if isinstance(data, (dict, list)) and _has(data, step):
            data = data[step]
        else:
            return None
    return data


def _cross_checks(doc: YamlDocument, cfg: AppConfig) -> list[ConfigIssue]:
    """Rules that span sections; each issue points at the line that has to change."""
    issues = []
    for name, mod in cfg.modules.items():
        here = ("modules", name)
        if mod.fuel is not None and (mod.engine or cfg.runtime.backend) != "wasmtime":
            engine = f"engine: {mod.engine}" if mod.engine else f"runtime.backend: {cfg.runtime.backend}"
            issues.append(ConfigIssue(doc.path, doc.mark_for(here + ("fuel",)), here + ("fuel",),
                                      f"fuel is counted by wasmtime alone, and this module runs on "
                                      f"{mod.engine or cfg.runtime.backend} ({engine}): set `engine: wasmtime` on "
                                      "it, or remove fuel"))
        if mod.source not in cfg.sources:
            near = difflib.get_close_matches(mod.source, list(cfg.sources), n=1, cutoff=0.5)
            hint = f" Did you mean {near[0]!r}?" if near else f" Defined sources: {', '.join(cfg.sources)}"
            issues.append(ConfigIssue(doc.path, doc.mark_for(here + ("source",)), here + ("source",),
                                      f"{mod.source!r} is not a source defined in this file.{hint}"))
            continue
        source = cfg.sources[mod.source]
        known = _channels_of(source)
        if mod.channels and known is not None:
            for i, ch in enumerate(mod.channels):
                if ch not in known:
                    issues.append(ConfigIssue(doc.path, doc.mark_for(here + ("channels", i)), here + ("channels", i),
                                              f"{ch!r} is not a channel of source {mod.source!r} "
                                              f"(channels: {', '.join(known)})"))
        video = getattr(type(source), "KIND", "samples") == "video"
        if mod.window is None and not video:
            issues.append(ConfigIssue(doc.path, doc.mark_for(here, key=True), here + ("window",),
                                      f"required option 'window' is missing from modules.{name} "
                                      f"(source {mod.source!r} delivers samples)"))
        if mod.window is not None and not video and mod.window.size < 16:
            issues.append(ConfigIssue(doc.path, doc.mark_for(here + ("window", "size")), here + ("window", "size"),
                                      f"{mod.window.size} is invalid: a window of samples needs at least 16 frames"))
        if mod.window is not None and video and mod.window.size != 1:
            issues.append(ConfigIssue(doc.path, doc.mark_for(here + ("window", "size")), here + ("window", "size"),
                                      f"{mod.window.size} is invalid: a camera's window is one frame (size: 1)"))
        if mod.overflow == "block" and getattr(source, "realtime", True):
            issues.append(ConfigIssue(doc.path, doc.mark_for(here + ("overflow",)), here + ("overflow",),
                                      f"'block' would stall live source {mod.source!r}; it is only for "
                                      f"replay sources with realtime: false"))
    for name, mod in cfg.modules.items():
        issues += _param_checks(doc, ("modules", name), mod)
    return issues


def _param_checks(doc: YamlDocument, here: tuple, mod: "ModuleSection") -> list[ConfigIssue]:
    """The module's params against the manifest in its .wasm (appliance/config/params.py)."""
    from appliance.config import params as schema
    try:
        manifest = schema.read_manifest(mod.wasm)
    except schema.ManifestError as exc:
        return [ConfigIssue(doc.path, doc.mark_for(here + ("wasm",)), here + ("wasm",),
                            f"{mod.wasm.name}: {exc}")]
    if manifest is None:
        schema.log.warning("%s: module %s has no params manifest; its params are not checked before it "
                           "starts (rebuild it with `appliance module build`)", doc.path, mod.wasm.name)
        return []
    issues = []
    for problem in schema.check(mod.params, manifest):
        path = here + ("params",) + problem.path
        issues.append(ConfigIssue(doc.path, doc.mark_for(path, key=problem.key_mark), path, problem.message))
    return issues


def _channels_of(source: Any) -> list[str] | None:
    for attr in ("axes", "channels"):
        value = getattr(source, attr, None)
        if value:
            return list(value)
    return None


def parse_config(doc: YamlDocument, base_dir: Path | None = None) -> AppConfig:
    """base_dir: where relative paths start (default: the file's own folder; a config delivered
    by the fleet, kept on /data, resolves them from the card's YAML's folder like the card's own)."""
    if not isinstance(doc.data, dict):
        raise ConfigError([ConfigIssue(doc.path, Mark(1, 1), (), "the config must be a mapping of sections "
                                       "(gateway, metrics, runtime, events, sources, modules)")])
    try:
        cfg = AppConfig.model_validate(doc.data, context={"base_dir": base_dir or doc.path.resolve().parent})
    except ValidationError as exc:
        raise ConfigError([issue_from_pydantic(doc, e) for e in exc.errors()]) from None
    issues = _cross_checks(doc, cfg)
    if issues:
        raise ConfigError(issues)
    return cfg


def load_config_document(path: str | Path = DEFAULT_CONFIG,
                         base_dir: Path | None = None) -> tuple[YamlDocument, AppConfig]:
    """Load and validate, keeping the document for line numbers; raises ConfigError only."""
    try:
        doc = load_yaml(path)
    except YamlError as exc:
        raise ConfigError([ConfigIssue(exc.path, exc.mark, (), exc.message)]) from None
    return doc, parse_config(doc, base_dir)


def load_config(path: str | Path = DEFAULT_CONFIG) -> AppConfig:
    """Load and validate; raises ConfigError (issues with file:line) and nothing else."""
    return load_config_document(path)[1]
