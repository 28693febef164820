"""Adapters: their formats and validation, the store and its backends, and the catalog that owns this
replica's adapter state (versions, compositions, pins, residency beside them)."""
