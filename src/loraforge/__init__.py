"""loraforge: train, store, serve, validate and grow LoRA adapters on a local machine."""

__version__ = "0.1.0"
