"""Commands on the configuration: show, validate, reload."""
from __future__ import annotations

import logging
from pathlib import Path

from appliance.ops.control.protocol import CommandError, Reply
from appliance.ops.control.text import redact

log = logging.getLogger("appliance.control")

class ConfigCommands:
    # ---- config

    def cmd_config(self, args: list[str], who: str) -> Reply:
        sub = args[0] if args else "show"
        if sub == "show" and len(args) <= 1:
            import yaml
            data = redact(self.sup.cfg.model_dump(mode="json"))
            where = f"# running configuration (from {self.config_path})" if self.config_path else \
                "# running configuration"
            head = [where]
            configs = getattr(self.sup, "configs", None)
            if configs is not None:
                running = configs.running()
                if running["source"] == "delivered":
                    head.append(f"# delivered by the fleet (revision {running.get('revision')}, sha256 "
                                f"{(running.get('sha256') or '?')[:12]}); the card's {running['card']} is not used "
                                "until it is edited")
                elif configs.on_probation is not None:
                    head.append(f"# a delivered config ({configs.on_probation['sha256'][:12]}) is on probation")
            text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=78)
            return Reply(True, [*head, "# defaults filled in, secrets hidden", *text.rstrip().split("\n")], data)
        if sub == "validate" and len(args) <= 2:
            return self._validate(Path(args[1]) if len(args) == 2 else self.config_path)
        if sub == "reload" and len(args) == 1:
            return self._reload(who)
        raise self._usage("config [show | validate [FILE] | reload]")

    def _validate(self, path: Path | None) -> Reply:
        if path is None:
            raise CommandError("this appliance's config file is not known here; give one: config validate FILE")
        from appliance.config.schema import ConfigError, load_config_document
        from appliance.runtime.modcheck import check_modules
        try:
            doc, cfg = load_config_document(path)
            issues = check_modules(doc, cfg)
            if issues:
                raise ConfigError(issues)
        except ConfigError as exc:
            n = len(exc.issues)
            raise CommandError("\n".join([f"{n} error{'s' if n != 1 else ''} in {path}:",
                                          *(f"  {i}" for i in exc.issues)])) from None
        return Reply(True, [f"{path}: ok ({len(cfg.sources)} sources, {len(cfg.modules)} modules)"],
                     {"ok": True, "sources": len(cfg.sources), "modules": len(cfg.modules)})

    def _reload(self, who: str) -> Reply:
        reload = getattr(self.sup, "reload_config", None)
        if reload is None:
            raise CommandError("config reload: not available in this build")
        from appliance.config.schema import ConfigError
        with self._changing:
            log.info("control: config reload (%s)", who or "operator")
            try:
                result = reload()
            except ConfigError as exc:
                n = len(exc.issues)
                raise CommandError("\n".join([f"not reloaded, still running the previous config; {n} "
                                              f"error{'s' if n != 1 else ''}:",
                                              *(f"  {i}" for i in exc.issues)])) from None
            except (OSError, ValueError, RuntimeError) as exc:
                raise CommandError(f"config reload failed: {type(exc).__name__}: {exc}") from None
        return Reply(True, str(result).split("\n"))
