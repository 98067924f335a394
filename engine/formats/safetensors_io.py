"""Reading .safetensors files, with every size checked before any data is read.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name
to {dtype, shape, data_offsets: [begin, end]} (offsets relative to the end of the header), then the raw
little-endian data. Downloads that stop early or files that are not safetensors at all are common, so the
header is validated against the real file size here and each problem gets its own message naming the file;
the safetensors library would report them as generic deserialization errors.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from ..errors import ModelError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    path: str  # the file holding the tensor, for reading and for error messages
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    nbytes: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parse and validate the header of one safetensors file; no tensor data is read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ModelError(f"{path}: file is {size} bytes, too short to be safetensors; download it again")
        header_len = int.from_bytes(prefix, "little")
        if 8 + header_len > size:
            raise ModelError(
                f"{path}: header length {header_len} runs past the end of the file ({size} bytes); "
                f"the file is truncated or not safetensors"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{path}: header is not valid JSON; the file is corrupt or not safetensors") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: header is not a JSON object; the file is corrupt or not safetensors")

    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: header entry for tensor {name} is malformed or has an unknown dtype") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if begin < 0 or end - begin != nbytes:
            raise ModelError(
                f"{path}: tensor {name} has data offsets [{begin}, {end}] that do not match its "
                f"shape {list(shape)} and dtype {entry['dtype']}; the file is corrupt"
            )
        if data_start + end > size:
            raise ModelError(
                f"{path}: data of tensor {name} ends at byte {data_start + end}, beyond the file size "
                f"({size} bytes); the file is truncated, download it again"
            )
        tensors[name] = TensorInfo(path, dtype, shape, data_start + begin, nbytes)
    return tensors


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor's data straight into a new CPU tensor."""
    out = torch.empty(info.shape, dtype=info.dtype)
    # A uint8 view lets numpy's buffer protocol cover dtypes numpy lacks (bfloat16, float8).
    buffer = out.view(-1).view(torch.uint8).numpy() if out.numel() else bytearray()
    with open(info.path, "rb") as f:
        f.seek(info.start)
        if f.readinto(buffer) != info.nbytes:
            raise ModelError(f"{info.path}: the file became shorter while it was being read; check the disk")
    return out
