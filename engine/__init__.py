"""ExLlama-style inference engine: 4-bit Llama-family models, streaming generation. Knows nothing about the web."""

from .errors import ModelError
from .loader import LoadedModel, load_model

__all__ = ["LoadedModel", "ModelError", "load_model"]
