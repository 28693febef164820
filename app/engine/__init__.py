"""The engine: the only code that touches the model. One thread runs every forward."""
