"""Adapter store, archive handling, validation and the registry of known adapters."""
