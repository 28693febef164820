"""Shared test helpers: PEFT reference adapters, archives, store snapshots."""
