"""Upstream delivery: the forwarder takes committed events from the spool, in order, and hands
them to a transport (MQTT or an HTTP webhook); an event leaves the spool only once the far side
acknowledged it (MQTT PUBACK, HTTP 2xx)."""
