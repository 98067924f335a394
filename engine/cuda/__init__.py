"""CUDA kernels for the engine, compiled on first use and cached.

Importing this package never needs a GPU or a compiler. Callers ask `available()` (which builds
the extension the first time) and, when it says no, use the PyTorch path and call
`warn_fallback()` once so the user sees why. `engine.cuda.q4` holds the 4-bit linear kernels.
"""

from .build import available, extension, unavailable_reason, warn_fallback

__all__ = ["available", "extension", "unavailable_reason", "warn_fallback"]
