"""HTTP layer: thin routes and wire schemas."""
