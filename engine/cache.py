"""KV cache: one preallocated key and value buffer per layer, written in place.

Positions are owned by the caller (the generator), which tracks which tokens the cache holds; rewinding
is just writing at an earlier position, since attention only reads slots at or before a query's position.
Each cache decides how attention over it runs (`attend`): SharedPrefixCache lets n parallel samples read
the context they share once per step.

Keys and values may be held in fewer bits (`KV_CACHE_KINDS`): at long contexts the cache, not the weights,
is most of what a decode step reads, and most of the memory. Each run of 32 entries of a head's vector keeps
a float16 scale and minimum, entry = minimum + scale * q with q of 8 or 4 bits. Keys lose more to 4 bits
than values do (a key error moves every softmax weight), hence "k8v4". Attention always sees the stored
values, prompt and decode alike, so a prompt's tokens and the tokens generated after it see the same cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .cuda import fused

# --kv-cache kind -> bits of keys and of values; None keeps the model's dtype.
KV_CACHE_KINDS = {"full": (None, None), "q8": (8, 8), "k8v4": (8, 4), "q4": (4, 4)}
QUANT_GROUP = 32  # entries per scale and minimum


def check_kv_cache(kind: str, head_dim: int) -> None:
    """Raise ValueError with what to do if a cache of `kind` cannot hold heads of `head_dim` entries."""
    if kind not in KV_CACHE_KINDS:
        raise ValueError(f"KV cache kind {kind!r} is not one of {', '.join(KV_CACHE_KINDS)}")
    # Quantized groups never straddle the two rotary halves of a head, which the GPU kernels write apart.
    if KV_CACHE_KINDS[kind] != (None, None) and head_dim % (2 * QUANT_GROUP):
        raise ValueError(f"a quantized KV cache needs a head size that is a multiple of {2 * QUANT_GROUP}; "
                         f"this model's is {head_dim}: use --kv-cache full")


def cache_bytes_per_entry(bits: int | None, dtype_bytes: int) -> float:
    """Bytes one cached key or value entry takes, its share of the group's scale and minimum included."""
    return dtype_bytes if bits is None else bits / 8 + 4 / QUANT_GROUP


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(data uint8 [..., dim * bits / 8], scales float16 [..., dim / 32, 2]) for x [..., dim]: each group of 32
    entries as q = round((x - minimum) / scale) in 0 .. 2^bits - 1, with (scale, minimum) per group. At 4 bits,
    byte j holds entry j in its low nibble and entry j + dim / 2 in its high one, the two rotary halves."""
    levels = (1 << bits) - 1
    groups = x.float().unflatten(-1, (-1, QUANT_GROUP))
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale, minimum = ((high - low) / levels).half(), low.half()
    # Rounded with the stored (float16) scale and minimum, so that dequantizing finds the nearest level.
    steps = (groups - minimum.float()) / torch.where(scale > 0, scale, 1).float()
    q = (steps + 0.5).floor().clamp(0, levels).to(torch.uint8).flatten(-2)
    if bits == 4:
        low_half, high_half = q.chunk(2, dim=-1)
        q = low_half | (high_half << 4)
    return q, torch.cat((scale, minimum), dim=-1)


def dequantize(data: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The entries that `quantize` stored, in dtype."""
    if bits == 4:
        data = torch.cat((data & 15, data >> 4), dim=-1)
    groups = data.unflatten(-1, (-1, QUANT_GROUP)).float()
    scale, minimum = scales.float().unbind(-1)
    return (groups * scale.unsqueeze(-1) + minimum.unsqueeze(-1)).flatten(-2).to(dtype)


class CacheTensor:
    """The keys or the values of one layer's cache, [batch, kv_heads, slots, head_dim]: in the model's dtype
    (`data` is that tensor), or with `bits` per entry (`data` the packed entries, `scales` their groups')."""

    def __init__(self, shape: tuple[int, int, int, int], bits: int | None, dtype: torch.dtype, device):
        batch, kv_heads, slots, head_dim = shape
        self.bits, self.dtype = bits, dtype
        if bits is None:
            self.data, self.scales = torch.zeros(shape, dtype=dtype, device=device), None
        else:
            self.data = torch.zeros(batch, kv_heads, slots, head_dim * bits // 8, dtype=torch.uint8, device=device)
            self.scales = torch.zeros(batch, kv_heads, slots, head_dim // QUANT_GROUP, 2, dtype=torch.float16,
                                      device=device)

    def write(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        """Store x [batch, kv_heads, length, head_dim] at `positions` of the slots."""
        if self.bits is None:
            self.data.index_copy_(2, positions, x)
            return
        x = x.to(self.dtype)  # rounded to the dtype first, as the decode kernel's keys are
        if fused.serves(x):  # one launch where PyTorch takes a dozen passes over float32 copies
            fused.store_vectors(x, positions, self.kernel_args())
            return
        data, scales = quantize(x, self.bits)
        self.data.index_copy_(2, positions, data)
        self.scales.index_copy_(2, positions, scales)

    def read(self, length: int) -> torch.Tensor:
        """Slots 0 .. length - 1 in the model's dtype: a view, or a dequantized copy."""
        if self.bits is None:
            return self.data[:, :, :length]
        if fused.serves(self.data):
            return fused.load_slots(self.kernel_args(), length, self.dtype)
        return dequantize(self.data[:, :, :length], self.scales[:, :, :length], self.bits, self.dtype)

    def kernel_args(self, row: int | None = None) -> tuple:
        """(data, scales, bits) for the fused kernels, of one batch row or of all (fused.unquantized where the
        entries are in the model's dtype)."""
        data = self.data if row is None else self.data[row]
        if self.scales is None:
            return fused.unquantized(data)
        return data, self.scales if row is None else self.scales[row], self.bits


class KVCache:
    def __init__(self, kv_heads: int, head_dim: int, max_seq_len: int, dtype: torch.dtype, device, batch: int = 1,
                 kind: str = "full"):
        check_kv_cache(kind, head_dim)
        shape = (batch, kv_heads, max_seq_len, head_dim)
        key_bits, value_bits = KV_CACHE_KINDS[kind]
        self.keys = CacheTensor(shape, key_bits, dtype, device)
        self.values = CacheTensor(shape, value_bits, dtype, device)
        self.kind, self.shape, self.dtype = kind, shape, dtype
        self.max_seq_len = max_seq_len

    @property
    def nbytes(self) -> int:
        """The bytes the cache allocates: entries, and scales where quantized."""
        parts = (self.keys.data, self.keys.scales, self.values.data, self.values.scales)
        return sum(t.nbytes for t in parts if t is not None)

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cache_len: int):
        """Store k, v [batch, kv_heads, length, head_dim] at `positions`; return the first cache_len slots."""
        if cache_len > self.max_seq_len:
            raise ValueError(f"the KV cache holds {self.max_seq_len} positions; {cache_len} do not fit")
        self.keys.write(k, positions)
        self.values.write(v, positions)
        return self.keys.read(cache_len), self.values.read(cache_len)

    def attend(self, q, k, v, positions: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Store this step's keys and values, then attend over the cache; other caches differ here. A bias of
        None means the step's tokens are the cache's first ones, attending causally."""
        keys, values = self.write(k, v, positions, q.shape[2] if bias is None else bias.shape[-1])
        return grouped_attention(q, keys, values, bias)

    def fuses(self, rows: int) -> bool:
        """Whether fused_attend serves a step of `rows` sequences: its kernels assume one."""
        return rows == 1 == self.shape[0]

    def fused_attend(self, q, k, v, cos, sin, positions: torch.Tensor, cache_len: int) -> torch.Tensor:
        """attend for one token on the GPU, q [1, heads, head_dim] and k, v [1, kv_heads, head_dim] before RoPE,
        in fused kernels: RoPE, the cache write and attention over slots 0..position (of at most cache_len)."""
        return fused.decode_attention(q[0], k[0], v[0], cos, sin, positions, self.keys.kernel_args(0),
                                      self.values.kernel_args(0), cache_len)


PROMPT_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def grouped_attention(q, keys, values, bias: torch.Tensor | None) -> torch.Tensor:
    """Attention where each KV head serves a group of query heads, without repeating the cache.

    q [batch, heads, length, head_dim]; keys and values [batch, kv_heads, cache_len, head_dim];
    bias [length, cache_len] is 0 where a query may see a key and -inf where it may not; None means
    plain causal attention of queries 0 .. length - 1 over as many keys.
    """
    batch, heads, length, head_dim = q.shape
    kv_heads = keys.shape[1]
    if q.is_cuda:
        # PyTorch's fused attention kernels, which never hold a long prompt's scores in memory; the plain
        # causal case runs flash attention, which takes no mask. Not cuDNN's: on an H200, once its attention
        # kernel has run, every later decode step's graph replays ~7% slower (bench/NOTES.md, session 4).
        flash = bias is None and q.dtype in (torch.float16, torch.bfloat16)
        if kv_heads != heads and not flash:
            # Only flash attention serves grouped heads; the memory-efficient kernel needs them repeated.
            keys = keys.repeat_interleave(heads // kv_heads, dim=1)
            values = values.repeat_interleave(heads // kv_heads, dim=1)
        mask = None if bias is None else bias.to(q.dtype)
        with sdpa_kernel(PROMPT_ATTENTION_BACKENDS):
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=bias is None,
                                                  enable_gqa=keys.shape[1] != heads)
    if bias is None:
        bias = torch.full((length, length), float("-inf"), device=q.device).triu(1)
    group = heads // kv_heads
    dtype = q.dtype
    if q.device.type == "cpu" and dtype == torch.float16 and length > 1:
        # CPU float16 batched products are slow; over a prompt they are worth a float32 copy.
        q, keys, values = q.float(), keys.float(), values.float()
    # Query head h uses KV head h // group, so a view puts each group's queries next to its keys.
    grouped = q.reshape(batch, kv_heads, group * length, head_dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * head_dim**-0.5
    weights = torch.softmax(scores + bias.repeat(group, 1), dim=-1).to(values.dtype)
    return torch.matmul(weights, values).view(batch, heads, length, head_dim).to(dtype)


class SharedPrefixCache:
    """The KV cache of n samples that all continue one context, for bifurcated attention.

    The context stays where the prefill put it, in the model's ordinary KVCache (`context`), stored once.
    Each sample's own tokens go to its row of `keys` and `values` [rows, kv_heads, capacity, head_dim]:
    own slot i holds position context_len + i. A decode step therefore reads the context once for all
    samples rather than once per sample, which is what lets n samples cost little more than one. The own
    slots are few, so they stay in the model's dtype whatever kind the context's cache is.

    Masks and the step's own slot (`own_slot`, shared by every layer's cache and set by the decoder) live in
    tensors, and the number of slots a step reads is set from outside (`context_slots`, `own_slots`), so a
    captured CUDA graph replays correctly at every position those slots cover.
    """

    def __init__(self, context: KVCache, rows: int, capacity: int, own_slot: torch.Tensor):
        _, kv_heads, max_seq_len, head_dim = context.shape
        dtype, device = context.dtype, context.keys.data.device
        self.context = context
        self.keys = torch.zeros(rows, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.context_len = torch.zeros(1, dtype=torch.long, device=device)
        self.own_slot = own_slot  # [1]: the own slot this step writes, which is also the last one it reads
        # 0 where a key may be seen, -inf where not; in the model's dtype, as baddbmm adds it to the scores.
        self.context_bias = torch.zeros(max_seq_len, dtype=dtype, device=device)
        self.own_bias = torch.zeros(capacity, dtype=dtype, device=device)
        self.context_slots = 0  # context slots a step reads: the context, or a larger (masked) graph bucket
        self.own_slots = 0  # own slots a step reads, likewise

    def start(self, context_len: int) -> None:
        """Begin new samples that continue the first context_len positions of the context cache."""
        self.context_len.fill_(context_len)
        self.context_bias.fill_(float("-inf"))
        self.context_bias[:context_len] = 0
        self.own_bias.fill_(float("-inf"))  # each step opens its own slot when it writes it

    def keep_rows(self, rows: list[int]) -> None:
        """Move the samples of these rows to the first len(rows) rows, in this order."""
        index = torch.tensor(rows, device=self.keys.device)
        self.keys[: len(rows)] = self.keys.index_select(0, index)
        self.values[: len(rows)] = self.values.index_select(0, index)

    def attend(self, q, k, v, positions: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """One decode step of every sample: q [rows, heads, 1, head_dim], k and v [rows, kv_heads, 1, head_dim],
        all at the one position `positions` [1]. The model's `bias` describes a single contiguous cache and
        does not apply here: the masks come from the context length and the own slots written so far."""
        rows = q.shape[0]
        keys, values = self.keys[:rows], self.values[:rows]
        keys.index_copy_(2, self.own_slot, k)
        values.index_copy_(2, self.own_slot, v)
        self.own_bias.index_fill_(0, self.own_slot, 0)
        context, own = self.context_slots, self.own_slots
        return bifurcated_attention(q, self.context.keys.read(context)[0], self.context.values.read(context)[0],
                                    self.context_bias[:context], keys[:, :, :own], values[:, :, :own],
                                    self.own_bias[:own])

    def fuses(self, rows: int) -> bool:
        return True

    def fused_attend(self, q, k, v, cos, sin, positions: torch.Tensor, cache_len: int) -> torch.Tensor:
        """attend on the GPU in three fused kernels, q [rows, heads, head_dim] and k, v [rows, kv_heads,
        head_dim]: RoPE with the write of each row's own slot, the context's share of attention for every
        row from one read of it, and a merge that adds each row's own slots."""
        fused.rope_and_store(q, k, v, cos, sin, self.own_slot, fused.unquantized(self.keys),
                             fused.unquantized(self.values))
        return fused.bifurcated_attention(q, self.context.keys.kernel_args(0), self.context.values.kernel_args(0),
                                          self.context_len, self.context_slots, self.keys, self.values, self.own_slot)


def bifurcated_attention(q, context_keys, context_values, context_bias, own_keys, own_values, own_bias):
    """Attention of n samples, one new query each, over a context they share plus each sample's own tokens.

    q [n, heads, 1, head_dim]; context keys and values [kv_heads, context, head_dim] with context_bias
    [context]; own keys and values [n, kv_heads, own, head_dim] with own_bias [own]. A bias is 0 where a
    key may be seen and -inf where not. The result is exact: the scores of both parts share one softmax.
    The context is read once for all samples, because its product takes the queries of every sample (and
    of every query head in a GQA group) as the rows of one matrix per KV head.
    """
    n, heads, _, head_dim = q.shape
    kv_heads, context = context_keys.shape[:2]
    group = heads // kv_heads
    scale = head_dim**-0.5
    q = q.reshape(n, kv_heads, group, head_dim)
    shared_q = q.transpose(0, 1).reshape(kv_heads, n * group, head_dim)
    context_scores = torch.baddbmm(context_bias, shared_q, context_keys.transpose(1, 2), alpha=scale)
    own_keys, own_values = own_keys.flatten(0, 1), own_values.flatten(0, 1)  # [n * kv_heads, own, head_dim]
    own_scores = torch.baddbmm(own_bias, q.reshape(n * kv_heads, group, head_dim), own_keys.transpose(1, 2),
                               alpha=scale)
    # Rows ordered [kv_heads, n, group], so the context's share of the weights is again one matrix per KV
    # head. Softmax accumulates in float32 whatever the scores' dtype.
    scores = torch.cat((context_scores.view(kv_heads, n, group, context),
                        own_scores.view(n, kv_heads, group, -1).transpose(0, 1)), dim=-1)
    weights = torch.softmax(scores, dim=-1)
    context_out = torch.matmul(weights[..., :context].reshape(kv_heads, n * group, context), context_values)
    own_weights = weights[..., context:].transpose(0, 1).reshape(n * kv_heads, group, -1)
    own_out = torch.matmul(own_weights, own_values)
    out = context_out.view(kv_heads, n, group, head_dim).transpose(0, 1) + own_out.view(n, kv_heads, group, head_dim)
    return out.reshape(n, heads, 1, head_dim)
