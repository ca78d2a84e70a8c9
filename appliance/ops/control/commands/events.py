"""Commands on the event spool: tail, show, requeue."""
from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

from appliance.ops.control.protocol import CommandError, Reply

log = logging.getLogger("appliance.control")

class EventCommands:
    # ---- events

    def cmd_events(self, args: list[str], who: str) -> Reply:
        sub = args[0] if args else "tail"
        if sub.isdigit():   # `events 5`
            sub, args = "tail", ["tail", *args]
        if sub == "tail" and len(args) <= 2:
            n = self._count(args[1:], 10)
            events = self.sup.spool.tail(n)
            lines = [f"{e['time']} {e['severity']:<8} {e['source']}/{e['module']}: {e['message']} [{e['id']}]"
                     for e in events]
            return Reply(True, lines or ["no events in the spool"], events)
        if sub == "show" and len(args) == 2:
            event = self._find_event(args[1])
            return Reply(True, json.dumps(event, indent=2, sort_keys=True).split("\n"), event)
        if sub == "requeue" and len(args) == 1:
            n = self.sup.spool.requeue_parked()
            log.info("control: events requeue (%s): %d parked event(s) offered upstream again", who, n)
            if n and getattr(self.sup, "forwarder", None) is not None:
                self.sup.forwarder.notify()
            return Reply(True, [f"{n} parked event(s) will be offered upstream again"], {"requeued": n})
        raise self._usage("events [tail N | show ID | requeue]")

    def _find_event(self, key: str) -> dict:
        key = key.strip().lower()
        if len(key) < 6 or any(c not in "0123456789abcdef-" for c in key):
            raise CommandError("an event id is hex digits and '-'; give it whole or at least 6 characters of it")
        path = Path(self.sup.spool.path)
        try:
            # A reader of its own: WAL lets it read beside the supervisor's writer.
            db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        except sqlite3.Error as exc:
            raise CommandError(f"cannot read the spool: {exc}") from None
        try:
            rows = db.execute("SELECT body FROM events WHERE id = ? OR id LIKE ? OR id LIKE ? "
                              "ORDER BY seq DESC LIMIT 3", (key, key + "%", "%" + key)).fetchall()
        except sqlite3.Error as exc:
            raise CommandError(f"cannot read the spool: {exc}") from None
        finally:
            db.close()
        exact = [r for r in rows if json.loads(r[0])["id"] == key]
        if exact:
            rows = exact
        if not rows:
            raise CommandError(f"no event {key} in the spool (it may have gone upstream already)")
        if len(rows) > 1:
            raise CommandError(f"'{key}' matches several events; give more of the id")
        return json.loads(rows[0][0])
