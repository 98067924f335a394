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

    def attend(self, q, k, v, positions: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Store this step's keys and values, then attend over the cache; other caches differ here."""
        keys, values = self.write(k, v, positions, bias.shape[-1])
        return grouped_attention(q, keys, values, bias)


def grouped_attention(q, keys, values, bias: torch.Tensor) -> torch.Tensor:
    """Attention where each KV head serves a group of query heads, without repeating the cache.

    q [batch, heads, length, head_dim]; keys and values [batch, kv_heads, cache_len, head_dim];
    bias [length, cache_len] is 0 where a query may see a key and -inf where it may not.
    """
    batch, heads, length, head_dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    # Query head h uses KV head h // group, so a view puts each group's queries next to its keys.
    grouped = q.reshape(batch, kv_heads, group * length, head_dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * head_dim**-0.5
    weights = torch.softmax(scores + bias.repeat(group, 1), dim=-1).to(values.dtype)
    return torch.matmul(weights, values).view(batch, heads, length, head_dim)
