"""The operator's fleet tools: `appliance fleet status|deploy|rollback`, and the NATS cluster the
fleet tests and demo run on (docs/fleet.md)."""
