"""Module bundles, signatures and deploys with probation and rollback (docs/deploy.md)."""
