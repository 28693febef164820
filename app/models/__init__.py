"""Base model loading, multi-adapter layers and classification heads."""
