"""Where artifacts live beyond one machine: object-store backends (local folder, S3), envelope encryption
at rest with per-tenant keys, and the tenant-scoped store that jobs read their inputs from and publish
their outputs to. See docs/storage.md."""
