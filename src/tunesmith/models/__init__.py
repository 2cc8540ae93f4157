"""Loading base models from local paths: transformers folders, GGUF files, packaged models by short name."""
from .loading import PACKAGED, VISION, is_vision_model, load_model, load_tokenizer, resolve_model

__all__ = ["PACKAGED", "VISION", "is_vision_model", "load_model", "load_tokenizer", "resolve_model"]
