"""KV cache: one preallocated key and value buffer per layer, written in place.

Positions are owned by the caller (the generator), which tracks which tokens the cache holds; rewinding
is just writing at an earlier position, since attention only reads slots at or before a query's position.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, kv_heads: int, head_dim: int, max_seq_len: int, dtype: torch.dtype, device):
        shape = (1, kv_heads, max_seq_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq_len = max_seq_len

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cache_len: int):
        """Store k, v [1, kv_heads, length, head_dim] at `positions`; return the first cache_len slots."""
        if cache_len > self.max_seq_len:
            raise ValueError(f"the KV cache holds {self.max_seq_len} positions; {cache_len} do not fit")
        self.keys.index_copy_(2, positions, k)
        self.values.index_copy_(2, positions, v)
        return self.keys[:, :, :cache_len], self.values[:, :, :cache_len]
