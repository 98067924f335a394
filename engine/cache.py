"""KV cache: one preallocated key and value buffer per layer, written in place.

Positions are owned by the caller (the generator), which tracks which tokens the cache holds; rewinding
is just writing at an earlier position, since attention only reads up to the position it is given.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, kv_heads: int, head_dim: int, max_seq_len: int, dtype: torch.dtype, device):
        shape = (1, kv_heads, max_seq_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq_len = max_seq_len

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [1, kv_heads, length, head_dim] at start.., return the cache up to the end of them."""
        end = start + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"the KV cache holds {self.max_seq_len} positions; position {end} does not fit")
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]
