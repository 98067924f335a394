"""Compile the CUDA extension on first use and cache it; say in one line why it cannot be used.

The build goes through torch.utils.cpp_extension (nvcc + ninja) into
$TORCH_EXTENSIONS_DIR, or ~/.cache/llm-chat/cuda, under a name that hashes the sources, the
PyTorch and CUDA versions and the GPU's compute capability, so an edit or an upgrade rebuilds
and an unchanged tree loads in well under a second.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_SOURCES = ("q4_binding.cpp", "q4_kernels.cu", "cache_attention.cu")
_HEADERS = ("q4_kernels.h", "cache_attention.h", "common.cuh")
# The kernels use fp16 mma.sync m16n8k16, which needs Ampere (8.0) or newer.
_MIN_CAPABILITY = (8, 0)


def cache_dir() -> Path:
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llm-chat" / "cuda"


def _missing_requirement() -> str | None:
    """Why the kernels cannot be built on this machine, or None if nothing is missing."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < _MIN_CAPABILITY:
        return f"the GPU has compute capability {major}.{minor}; the kernels need 8.0 or newer"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc (the CUDA compiler) was not found; install the CUDA toolkit or set CUDA_HOME"
    if not cpp_extension.is_ninja_available():
        return "ninja was not found; pip install ninja"
    return None


def _build_name() -> str:
    digest = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        digest.update((_HERE / name).read_bytes())
    major, minor = torch.cuda.get_device_capability()
    digest.update(f"{torch.__version__}|{torch.version.cuda}|sm_{major}{minor}".encode())
    return f"engine_q4_{digest.hexdigest()[:12]}"


@functools.cache
def extension():
    """The compiled module, built on first use. Raises RuntimeError with a one-line reason."""
    missing = _missing_requirement()
    if missing:
        raise RuntimeError(missing)
    from torch.utils import cpp_extension

    name = _build_name()
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob(f"{name}*.so")):
        print(f"engine: compiling the CUDA kernels (first use, about a minute) into {build_dir}", file=sys.stderr)
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(_HERE / s) for s in _SOURCES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as error:  # a compiler or loader failure; the details belong in the log
        log.error("building the CUDA kernels in %s failed", build_dir, exc_info=True)
        raise RuntimeError(f"building the CUDA kernels failed ({type(error).__name__}); see the log") from error


@functools.cache
def unavailable_reason() -> str | None:
    """None when the kernels are built and loaded, else why not (building them if needed)."""
    try:
        extension()
    except RuntimeError as error:
        return str(error)
    return None


def available() -> bool:
    return unavailable_reason() is None


@functools.cache
def warn_fallback() -> None:
    """Tell the user once, in one line on stderr, that the slower PyTorch path is in use."""
    print(f"engine: CUDA kernels not used ({unavailable_reason()}); using the PyTorch path", file=sys.stderr)
