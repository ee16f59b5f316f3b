"""Base models: the catalog of aliases, Hugging Face ids and local folders, and the built-in `tiny`."""

from loraforge.models.resolve import (  # noqa: F401
    DEFAULT_MODEL,
    BaseModelRef,
    ModelInfo,
    catalog,
    load_base_model,
    model_info,
    resolve_base_model,
)
