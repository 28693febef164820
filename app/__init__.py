"""adapterserve: many adapters, one frozen base model, batched together."""

__version__ = "0.1.0"
