"""Fused Triton kernels for the batch-1 decode step: RMSNorm, RoPE, the KV-cache write, SiLU-multiply
and decode attention.

At batch 1 every small PyTorch op is a kernel of a few microseconds, and a Llama layer has dozens of
them; these kernels do each job in one launch. Decode attention reads the valid length from the
position tensor, so a graph captured for a bucket of cache lengths reads only the filled slots, and it
serves each KV head's whole group of query heads from one read of the cache.

Importing this module needs Triton, which comes with CUDA builds of PyTorch; callers check
`available()` first.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernels():
    """Compile lazily, so that importing the engine never needs Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_kernel(x_ptr, w_ptr, y_ptr, n, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        tl.store(y_ptr + row * n + cols, (x * rstd).to(w.dtype) * w, mask=mask)

    @triton.jit
    def rope_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, keys_ptr, values_ptr,
                          q_heads, max_seq, HALF: tl.constexpr):
        # One program per head of one token: rotate q in place; rotate k and store it with v in the cache.
        head = tl.program_id(0)
        pos = tl.load(pos_ptr)
        i = tl.arange(0, HALF)
        cos = tl.load(cos_ptr + i).to(tl.float32)  # the token's row: both halves hold the same angles
        sin = tl.load(sin_ptr + i).to(tl.float32)
        if head < q_heads:
            base = q_ptr + head * 2 * HALF
            a = tl.load(base + i).to(tl.float32)
            b = tl.load(base + HALF + i).to(tl.float32)
            tl.store(base + i, (a * cos - b * sin).to(q_ptr.dtype.element_ty))
            tl.store(base + HALF + i, (b * cos + a * sin).to(q_ptr.dtype.element_ty))
        else:
            h = head - q_heads
            a = tl.load(k_ptr + h * 2 * HALF + i).to(tl.float32)
            b = tl.load(k_ptr + h * 2 * HALF + HALF + i).to(tl.float32)
            slot = (h * max_seq + pos) * 2 * HALF
            tl.store(keys_ptr + slot + i, (a * cos - b * sin).to(keys_ptr.dtype.element_ty))
            tl.store(keys_ptr + slot + HALF + i, (b * cos + a * sin).to(keys_ptr.dtype.element_ty))
            tl.store(values_ptr + slot + i, tl.load(v_ptr + h * 2 * HALF + i))
            tl.store(values_ptr + slot + HALF + i, tl.load(v_ptr + h * 2 * HALF + HALF + i))

    @triton.jit
    def silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def decode_attention_kernel(q_ptr, keys_ptr, values_ptr, pos_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
                                max_seq, scale, splits, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                                DIM: tl.constexpr, BLOCK: tl.constexpr):
        # Program (kv head, split): the split's share of the positions 0..pos, for all the query heads
        # of that KV head at once, with an online softmax; a second kernel merges the splits.
        kv_head = tl.program_id(0)
        split = tl.program_id(1)
        length = tl.load(pos_ptr) + 1
        per_split = tl.cdiv(tl.cdiv(length, splits), BLOCK) * BLOCK
        start = split * per_split
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM)
        q = tl.load(q_ptr + (kv_head * GROUP + g[:, None]) * DIM + d[None, :], mask=g[:, None] < GROUP, other=0.0)
        running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        running_sum = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM], tl.float32)
        for block_start in range(start, tl.minimum(start + per_split, length), BLOCK):
            n = block_start + tl.arange(0, BLOCK)
            valid = n < length
            offsets = (kv_head * max_seq + n[:, None]) * DIM + d[None, :]
            k = tl.load(keys_ptr + offsets, mask=valid[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            correction = tl.exp(running_max - new_max)
            p = tl.exp(scores - new_max[:, None])
            running_sum = running_sum * correction + tl.sum(p, axis=1)
            v = tl.load(values_ptr + offsets, mask=valid[:, None], other=0.0)
            acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            running_max = new_max
        part = (kv_head * splits + split) * GROUP_PAD + g
        tl.store(part_out_ptr + part[:, None] * DIM + d[None, :], acc)
        tl.store(part_max_ptr + part, running_max)
        tl.store(part_sum_ptr + part, running_sum)

    @triton.jit
    def merge_splits_kernel(part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr, splits,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr,
                            SPLITS_PAD: tl.constexpr):
        kv_head = tl.program_id(0)
        g = tl.program_id(1)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, DIM)
        part = (kv_head * splits + s) * GROUP_PAD + g
        in_range = s < splits
        maxes = tl.load(part_max_ptr + part, mask=in_range, other=float("-inf"))
        best = tl.max(maxes, axis=0)
        weights = tl.where(maxes == float("-inf"), 0.0, tl.exp(maxes - best))  # empty splits weigh nothing
        sums = tl.load(part_sum_ptr + part, mask=in_range, other=0.0)
        outs = tl.load(part_out_ptr + part[:, None] * DIM + d[None, :], mask=in_range[:, None], other=0.0)
        total = tl.sum(outs * weights[:, None], axis=0) / tl.sum(sums * weights, axis=0)
        tl.store(out_ptr + (kv_head * GROUP + g) * DIM + d, total.to(out_ptr.dtype.element_ty))

    return rms_norm_kernel, rope_store_kernel, silu_mul_kernel, decode_attention_kernel, merge_splits_kernel


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    kernel = _kernels()[0]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty_like(x2)
    kernel[(x2.shape[0],)](x2, weight, y, x2.shape[1], eps, BLOCK=_next_pow2(x2.shape[1]))
    return y.view(x.shape)


def rope_and_store(q, k, v, cos, sin, position, keys, values) -> None:
    """For one token: rotate q [q_heads, dim] in place; rotate k and store it and v [kv_heads, dim] at
    `position` (a one-element tensor) of the cache keys / values [1, kv_heads, max_seq, dim].
    cos and sin are the token's rows of the rotary tables."""
    kernel = _kernels()[1]
    q_heads, kv_heads, dim = q.shape[0], k.shape[0], q.shape[-1]
    kernel[(q_heads + kv_heads,)](q, k, v, cos, sin, position, keys, values, q_heads, keys.shape[2], HALF=dim // 2)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    kernel = _kernels()[2]
    out = torch.empty_like(gate)
    n = gate.numel()
    kernel[(-(-n // 1024),)](gate, up, out, n, BLOCK=1024)
    return out


ATTENTION_BLOCK = 64


def decode_attention(q, keys, values, position, max_length: int) -> torch.Tensor:
    """Attention of one token's q [q_heads, dim] over cache slots 0..position (a one-element tensor).

    `max_length` bounds the position (the graph bucket): it sets how many splits share the work, so
    that long contexts spread over the whole GPU while short ones stay one block per KV head.
    """
    _, _, attention, merge = _kernels()[1:]
    kv_heads, max_seq, dim = keys.shape[1], keys.shape[2], keys.shape[3]
    group = q.shape[0] // kv_heads
    group_pad = max(16, _next_pow2(group))  # tl.dot needs at least 16 rows
    splits = max(1, min(64, max_length // 256))
    part_out = torch.empty(kv_heads * splits * group_pad, dim, device=q.device, dtype=torch.float32)
    part_max = torch.empty(kv_heads * splits * group_pad, device=q.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    attention[(kv_heads, splits)](q, keys, values, position, part_out, part_max, part_sum, max_seq, dim**-0.5,
                                  splits, GROUP=group, GROUP_PAD=group_pad, DIM=dim, BLOCK=ATTENTION_BLOCK)
    out = torch.empty_like(q)
    merge[(kv_heads, group)](part_out, part_max, part_sum, out, splits, GROUP=group, GROUP_PAD=group_pad,
                             DIM=dim, SPLITS_PAD=max(2, _next_pow2(splits)))
    return out
