"""Fused Triton kernels for the decode step: RMSNorm, RoPE with the KV-cache write, SiLU-multiply, decode
attention, for one sequence or for n samples sharing a context (bifurcated attention), the first
product of a LoRA update, and the row lookup in an embedding table kept in CPU memory; and for prompts, the
write and read of a quantized KV cache.

At batch 1 every small PyTorch op is a kernel of a few microseconds, and a Llama layer has dozens of
them; these kernels do each job in one launch. Attention reads the valid length from a tensor, so a
graph captured for a bucket of cache lengths reads only the filled slots, and one read of a KV head's
cache serves all the query rows that use it: the heads of a GQA group, and the same heads of every
sample that continues a shared context. For one sequence the attention kernel also rotates the new token's
q and k and writes its key and value to the cache, so that a step's attention is one launch and the merge.

Attention over a 4-bit cache runs a CUDA kernel of the compiled extension instead where it can
(cache_attention.cu).

Importing this module needs Triton, which comes with CUDA builds of PyTorch; callers check
`available()` first.
"""

from __future__ import annotations

import functools
import types

import torch

from .build import available as cuda_kernels_available
from .build import extension


@functools.cache
def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def serves(x: torch.Tensor) -> bool:
    """Whether these kernels can take x: it is on a GPU and Triton is there."""
    return x.is_cuda and available()


@functools.cache
def _kernels():
    """Compile lazily, so that importing the engine never needs Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def follow_previous_kernel(PDL: tl.constexpr):
        # Launched as a programmatic dependent (see _launch): let the next kernel in the stream start as soon
        # as all of this one's programs run, then wait until the previous kernel's writes are visible. Every
        # kernel calls this before it touches memory, so none reads or overwrites what an earlier one still uses
        # (attention_parts_kernel reads the cache sooner and says why it may).
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def rms_norm_kernel(x_ptr, r_ptr, sum_ptr, w_ptr, y_ptr, n, eps, ADD: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr):
        # Program row: y = RMSNorm(x), or with ADD, sum = x + r (rounded as the eager add rounds it) and
        # y = RMSNorm(sum).
        follow_previous_kernel(PDL)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
        if ADD:
            x += tl.load(r_ptr + row * n + cols, mask=mask, other=0.0)
            tl.store(sum_ptr + row * n + cols, x, mask=mask)
        x = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        tl.store(y_ptr + row * n + cols, (x * rstd).to(w.dtype) * w, mask=mask)

    @triton.jit
    def group_levels(x, BITS: tl.constexpr, N: tl.constexpr):
        # x [N] (float32) as levels 0 .. 2^BITS - 1 [N // 32, 32] (float32) and each group of 32 entries' scale and
        # minimum (float16): what cache.quantize computes, with the same float16 rounding and IEEE division.
        groups = tl.reshape(x, (N // 32, 32))
        low = tl.min(groups, axis=1)
        high = tl.max(groups, axis=1)
        levels = tl.zeros_like(low) + ((1 << BITS) - 1)
        scale = tl.math.div_rn(high - low, levels).to(tl.float16)
        minimum = low.to(tl.float16)
        divisor = tl.where(scale > 0, scale.to(tl.float32), 1.0)
        steps = tl.math.div_rn(groups - minimum.to(tl.float32)[:, None], divisor[:, None])
        return tl.minimum(tl.maximum(tl.floor(steps + 0.5), 0.0), levels[:, None]), scale, minimum

    @triton.jit
    def quantize_groups(x, scales_ptr, BITS: tl.constexpr, HALF: tl.constexpr):
        # x [HALF] (float32) as levels (group_levels), storing each group's (scale, minimum) at scales_ptr.
        q, scale, minimum = group_levels(x, BITS, HALF)
        g = tl.arange(0, HALF // 32)
        tl.store(scales_ptr + 2 * g, scale)
        tl.store(scales_ptr + 2 * g + 1, minimum)
        return tl.reshape(q.to(tl.int32), (HALF,))

    @triton.jit
    def as_stored(x, data_ptr, BITS: tl.constexpr, DIM: tl.constexpr):
        # A vector x [DIM] (float32) as a cache of BITS that stores it would give it back (load_vectors).
        if BITS == 16:
            return x.to(data_ptr.dtype.element_ty).to(tl.float32)
        else:
            q, scale, minimum = group_levels(x, BITS, DIM)
            return tl.reshape(q * scale.to(tl.float32)[:, None] + minimum.to(tl.float32)[:, None], (DIM,))

    @triton.jit
    def store_head(data_ptr, scales_ptr, slot, a, b, BITS: tl.constexpr, HALF: tl.constexpr):
        # Store one head's vector, halves a and b [HALF] (float32, rounded to the cache's dtype), at cache slot
        # `slot` (counted over all heads and rows), in the layout of cache.CacheTensor: as it is with BITS 16,
        # else quantized, its groups' scales and minimums beside it.
        i = tl.arange(0, HALF)
        if BITS == 16:
            target = data_ptr + slot * 2 * HALF
            tl.store(target + i, a.to(data_ptr.dtype.element_ty))
            tl.store(target + HALF + i, b.to(data_ptr.dtype.element_ty))
        else:
            scales = scales_ptr + slot * 2 * (2 * HALF // 32)
            qa = quantize_groups(a, scales, BITS, HALF)
            qb = quantize_groups(b, scales + 2 * (HALF // 32), BITS, HALF)
            if BITS == 8:
                tl.store(data_ptr + slot * 2 * HALF + i, qa.to(tl.uint8))
                tl.store(data_ptr + slot * 2 * HALF + HALF + i, qb.to(tl.uint8))
            else:  # 4 bits: byte j holds entry j and, in its high nibble, entry HALF + j
                tl.store(data_ptr + slot * HALF + i, (qa | (qb << 4)).to(tl.uint8))

    @triton.jit
    def store_vector(data_ptr, scales_ptr, slot, x, BITS: tl.constexpr, DIM: tl.constexpr):
        # store_head for a whole vector x [DIM].
        a, b = tl.split(tl.permute(tl.reshape(x, (2, DIM // 2)), (1, 0)))
        store_head(data_ptr, scales_ptr, slot, a, b, BITS, DIM // 2)

    @triton.jit
    def load_vectors(data_ptr, scales_ptr, slots, valid, BITS: tl.constexpr, DIM: tl.constexpr,
                     BLOCK: tl.constexpr):
        # The cached vectors [BLOCK, DIM] at `slots` (counted over all heads), zero where not valid: as stored
        # with BITS 16, else dequantized to float32. A quantized tile is read as [slot, group, entry], so that
        # each group's scale and minimum are one load per slot, broadcast over its 32 entries.
        if BITS == 16:
            d = tl.arange(0, DIM)
            return tl.load(data_ptr + slots[:, None] * DIM + d[None, :], mask=valid[:, None], other=0.0)
        else:
            g = tl.arange(0, DIM // 32)
            j = tl.arange(0, 32)
            if BITS == 8:
                entries = data_ptr + slots[:, None, None] * DIM + g[None, :, None] * 32 + j[None, None, :]
                q = tl.load(entries, mask=valid[:, None, None], other=0)
            else:  # groups of the first half in the low nibbles of a vector's bytes, of the second in the high
                half_groups = DIM // 64
                entries = (data_ptr + slots[:, None, None] * (DIM // 2) + (g % half_groups)[None, :, None] * 32
                           + j[None, None, :])
                packed = tl.load(entries, mask=valid[:, None, None], other=0)
                q = (packed >> (4 * (g // half_groups)).to(tl.uint8)[None, :, None]) & 15
            groups = scales_ptr + (slots[:, None] * (DIM // 32) + g[None, :]) * 2
            scale = tl.load(groups, mask=valid[:, None], other=0.0).to(tl.float32)
            minimum = tl.load(groups + 1, mask=valid[:, None], other=0.0).to(tl.float32)
            return tl.reshape(q.to(tl.float32) * scale[:, :, None] + minimum[:, :, None], (BLOCK, DIM))

    @triton.jit
    def rope_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, keys_ptr, key_scales_ptr, values_ptr,
                          value_scales_ptr, q_heads, q_row_stride, kv_row_stride, row_slots, max_seq,
                          HALF: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, PDL: tl.constexpr):
        # Program (row, head) of one position: rotate q in place; rotate k and store it with v in that
        # row's cache at the slot held in slot_ptr (row_slots: a row's slots over all its heads). q, k and v
        # may be views into one row of q, k and v.
        follow_previous_kernel(PDL)
        row = tl.program_id(0)
        head = tl.program_id(1)
        i = tl.arange(0, HALF)
        cos = tl.load(cos_ptr + i).to(tl.float32)  # the position's row: both halves hold the same angles
        sin = tl.load(sin_ptr + i).to(tl.float32)
        if head < q_heads:
            base = q_ptr + row * q_row_stride + head * 2 * HALF
            a = tl.load(base + i).to(tl.float32)
            b = tl.load(base + HALF + i).to(tl.float32)
            tl.store(base + i, (a * cos - b * sin).to(q_ptr.dtype.element_ty))
            tl.store(base + HALF + i, (b * cos + a * sin).to(q_ptr.dtype.element_ty))
        else:
            h = head - q_heads
            source = row * kv_row_stride + h * 2 * HALF
            slot = row * row_slots + h * max_seq + tl.load(slot_ptr)
            a = tl.load(k_ptr + source + i).to(tl.float32)
            b = tl.load(k_ptr + source + HALF + i).to(tl.float32)
            dtype = k_ptr.dtype.element_ty  # rounded as the eager path's keys are, before any quantizing
            store_head(keys_ptr, key_scales_ptr, slot, (a * cos - b * sin).to(dtype).to(tl.float32),
                       (b * cos + a * sin).to(dtype).to(tl.float32), KEY_BITS, HALF)
            store_head(values_ptr, value_scales_ptr, slot, tl.load(v_ptr + source + i).to(tl.float32),
                       tl.load(v_ptr + source + HALF + i).to(tl.float32), VALUE_BITS, HALF)

    @triton.jit
    def silu_mul_kernel(gate_up_ptr, out_ptr, a_ptr, part_ptr, n, rank, PROJECT: tl.constexpr,
                        RANK: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # Program (p, row): out = silu(gate) * up for entries p * BLOCK .. of the row, where a row of
        # gate_up holds gate and then up, n entries each. With PROJECT (one row), program p also stores
        # its entries' share of out @ a^T as partial sum p, which the next layer's 4-bit kernel adds up.
        follow_previous_kernel(PDL)
        p = tl.program_id(0)
        row = tl.program_id(1)
        offsets = p * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        g = tl.load(gate_up_ptr + row * 2 * n + offsets, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gate_up_ptr + row * 2 * n + n + offsets, mask=mask, other=0.0).to(tl.float32)
        out = (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * n + offsets, out, mask=mask)
        if PROJECT:
            r = tl.arange(0, RANK)
            a = tl.load(a_ptr + r[:, None] * n + offsets[None, :], mask=(r[:, None] < rank) & mask[None, :], other=0.0)
            partial = tl.sum(a.to(tl.float32) * out.to(tl.float32)[None, :], axis=1)
            tl.store(part_ptr + p * rank + r, partial, mask=r < rank)

    @triton.jit
    def attend_block(q, k, v, valid, scale, running_max, running_sum, acc):
        # One block of cached slots (k, v [BLOCK, DIM] in q's dtype; valid [BLOCK]) into the online softmax of the
        # rows of q; returns the new running maximum, sum and output.
        scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp(running_max - new_max)
        p = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        return new_max, running_sum, acc

    @triton.jit
    def attention_parts_kernel(q_ptr, keys_ptr, key_scales_ptr, values_ptr, value_scales_ptr, length_ptr,
                               length_bias, part_out_ptr, part_max_ptr, part_sum_ptr, rows, q_row_stride, max_seq,
                               scale, splits, k_ptr, v_ptr, cos_ptr, sin_ptr, GROUP: tl.constexpr,
                               ROWS: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr, KEY_BITS: tl.constexpr,
                               VALUE_BITS: tl.constexpr, NEW: tl.constexpr, PDL: tl.constexpr):
        # Program (kv head, split, row block): the split's share of cache slots 0 .. length - 1 (length =
        # *length_ptr + length_bias) for ROWS query rows of that KV head, with an online softmax; the
        # merge kernel combines the parts. Query row r is head (kv head * GROUP + r % GROUP) of sample
        # r // GROUP, so one read of the cache serves a GQA group, or the same head of many samples.
        # With NEW, the last slot is one sample's new token: q, and its key and value at k_ptr and v_ptr
        # [kv_heads, DIM], come before RoPE (cos_ptr and sin_ptr: the position's angles). Every program rotates
        # its q rows; the split that holds the last slot alone rotates the key, stores the key and value in the
        # cache (its first row block) and takes the token from its registers, as stored. The store may land
        # after other programs have read, so every program reads only the slots before the last.
        #
        # With NEW the program reads its first block of slots before it waits for the previous kernel, so that the
        # read overlaps that kernel's tail (follow_previous_kernel otherwise waits first). Only q, k and v come from
        # that kernel. The slot count was set before the step began, and the slots before the last were written
        # by earlier steps: between two steps' attention runs a linear layer, whose 4-bit kernel lets the next
        # kernel start only after its own wait, and a cuBLAS one only at its end, so every kernel before it has
        # finished.
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            if not NEW:
                tl.extra.cuda.gdc_wait()
        kv_head = tl.program_id(0)
        split = tl.program_id(1)
        r = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
        length = tl.load(length_ptr) + length_bias
        cached = length
        if NEW:
            cached = length - 1
        per_split = tl.cdiv(tl.cdiv(length, splits), BLOCK) * BLOCK
        start = split * per_split
        end = tl.minimum(start + per_split, cached)  # per_split is whole blocks: no block crosses a split's end
        first = start + tl.arange(0, BLOCK)
        first_valid = first < end
        first_k = load_vectors(keys_ptr, key_scales_ptr, kv_head * max_seq + first, first_valid, KEY_BITS, DIM, BLOCK)
        first_v = load_vectors(values_ptr, value_scales_ptr, kv_head * max_seq + first, first_valid, VALUE_BITS, DIM,
                               BLOCK)
        if PDL:
            if NEW:
                tl.extra.cuda.gdc_wait()
        d = tl.arange(0, DIM)
        q_rows = (r // GROUP) * q_row_stride + (kv_head * GROUP + r % GROUP) * DIM
        q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=(r < rows)[:, None], other=0.0)
        if NEW:
            # Entry d turns with entry d + DIM / 2 (mod DIM) by angle d mod DIM / 2, as rope_store_kernel does.
            partner = (d + DIM // 2) % DIM
            cos = tl.load(cos_ptr + d % (DIM // 2)).to(tl.float32)
            sin = tl.load(sin_ptr + d % (DIM // 2)).to(tl.float32) * tl.where(d < DIM // 2, -1.0, 1.0)
            q_partner = tl.load(q_ptr + q_rows[:, None] + partner[None, :], mask=(r < rows)[:, None], other=0.0)
            q = (q.to(tl.float32) * cos[None, :] + q_partner.to(tl.float32) * sin[None, :]).to(q.dtype)
        running_max = tl.full([ROWS], float("-inf"), tl.float32)
        running_sum = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DIM], tl.float32)
        if start < end:
            running_max, running_sum, acc = attend_block(q, first_k.to(q.dtype), first_v.to(q.dtype), first_valid,
                                                         scale, running_max, running_sum, acc)
        for block_start in range(start + BLOCK, end, BLOCK):
            n = block_start + tl.arange(0, BLOCK)
            valid = n < end
            slots = kv_head * max_seq + n
            k = load_vectors(keys_ptr, key_scales_ptr, slots, valid, KEY_BITS, DIM, BLOCK).to(q.dtype)
            v = load_vectors(values_ptr, value_scales_ptr, slots, valid, VALUE_BITS, DIM, BLOCK).to(q.dtype)
            running_max, running_sum, acc = attend_block(q, k, v, valid, scale, running_max, running_sum, acc)
        if NEW:
            if (start <= cached) & (cached < start + per_split):
                new_k = tl.load(k_ptr + kv_head * DIM + d).to(tl.float32) * cos
                new_k += tl.load(k_ptr + kv_head * DIM + partner).to(tl.float32) * sin
                new_k = new_k.to(k_ptr.dtype.element_ty).to(tl.float32)  # rounded as the eager path's keys are
                new_v = tl.load(v_ptr + kv_head * DIM + d).to(tl.float32)
                if tl.program_id(2) == 0:
                    store_vector(keys_ptr, key_scales_ptr, kv_head * max_seq + cached, new_k, KEY_BITS, DIM)
                    store_vector(values_ptr, value_scales_ptr, kv_head * max_seq + cached, new_v, VALUE_BITS, DIM)
                stored_k = as_stored(new_k, keys_ptr, KEY_BITS, DIM)
                stored_v = as_stored(new_v, values_ptr, VALUE_BITS, DIM)
                score = tl.sum(q.to(tl.float32) * stored_k[None, :], axis=1) * scale
                new_max = tl.maximum(running_max, score)
                correction = tl.exp(running_max - new_max)
                p = tl.exp(score - new_max)
                running_sum = running_sum * correction + p
                acc = acc * correction[:, None] + p[:, None] * stored_v[None, :]
                running_max = new_max
        part = (kv_head * splits + split) * rows + r
        tl.store(part_out_ptr + part[:, None] * DIM + d[None, :], acc, mask=(r < rows)[:, None])
        tl.store(part_max_ptr + part, running_max, mask=r < rows)
        tl.store(part_sum_ptr + part, running_sum, mask=r < rows)

    @triton.jit
    def merge_parts_kernel(part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr, rows, q_row_stride, out_row_stride,
                           splits,
                           q_ptr, own_keys_ptr, own_values_ptr, own_slot_ptr, own_row_stride, own_capacity, scale,
                           GROUP: tl.constexpr, DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
                           OWN: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # Program (kv head, query row): combine the splits' parts into the row's attention output. With
        # OWN, the row's sample also attends over its own slots 0 .. *own_slot_ptr (few: the tokens the
        # samples generated so far), folded in here as one more part.
        follow_previous_kernel(PDL)
        kv_head = tl.program_id(0)
        r = tl.program_id(1)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, DIM)
        part = (kv_head * splits + s) * rows + r
        in_range = s < splits
        maxes = tl.load(part_max_ptr + part, mask=in_range, other=float("-inf"))
        sums = tl.load(part_sum_ptr + part, mask=in_range, other=0.0)
        outs = tl.load(part_out_ptr + part[:, None] * DIM + d[None, :], mask=in_range[:, None], other=0.0)
        best = tl.max(maxes, axis=0)
        head = kv_head * GROUP + r % GROUP
        q_row = (r // GROUP) * q_row_stride + head * DIM
        if OWN:
            q = tl.load(q_ptr + q_row + d).to(tl.float32)
            own_length = tl.load(own_slot_ptr) + 1
            base = (r // GROUP) * own_row_stride + kv_head * own_capacity * DIM
            own_max = tl.full([1], float("-inf"), tl.float32)
            own_sum = tl.zeros([1], tl.float32)
            own_acc = tl.zeros([DIM], tl.float32)
            for block_start in range(0, own_length, BLOCK):
                n = block_start + tl.arange(0, BLOCK)
                valid = n < own_length
                offsets = base + n[:, None] * DIM + d[None, :]
                k = tl.load(own_keys_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
                scores = tl.where(valid, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
                new_max = tl.maximum(own_max, tl.max(scores, axis=0))
                correction = tl.exp(own_max - new_max)
                p = tl.exp(scores - new_max)
                own_sum = own_sum * correction + tl.sum(p, axis=0)
                v = tl.load(own_values_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
                own_acc = own_acc * correction + tl.sum(p[:, None] * v, axis=0)
                own_max = new_max
            best = tl.maximum(best, tl.max(own_max, axis=0))
        weights = tl.where(maxes == float("-inf"), 0.0, tl.exp(maxes - best))  # empty splits weigh nothing
        total = tl.sum(outs * weights[:, None], axis=0)
        norm = tl.sum(sums * weights, axis=0)
        if OWN:
            own_weight = tl.exp(own_max - best)
            total += own_acc * own_weight
            norm += tl.sum(own_sum * own_weight, axis=0)
        tl.store(out_ptr + (r // GROUP) * out_row_stride + head * DIM + d, (total / norm).to(out_ptr.dtype.element_ty))

    @triton.jit
    def low_rank_project_kernel(x_ptr, r_ptr, sum_ptr, w_ptr, a_ptr, y_ptr, h_ptr, n, eps, NORM: tl.constexpr,
                                ADD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # h = y @ a^T for one row, where y is x, or with NORM its RMSNorm (with ADD, that of x + r). Program i
        # computes output i of h from a single load of y and of a's row i, so that each program waits for
        # memory once and the reads of a spread over many multiprocessors; with NORM, program 0 stores y
        # (and with ADD the sum) instead and the others are shifted by one.
        follow_previous_kernel(PDL)
        i = tl.program_id(0) - NORM
        k = tl.arange(0, BLOCK)
        mask = k < n
        y = tl.load(x_ptr + k, mask=mask, other=0.0)
        if ADD:
            y += tl.load(r_ptr + k, mask=mask, other=0.0)
            if i < 0:
                tl.store(sum_ptr + k, y, mask=mask)
        y = y.to(tl.float32)
        if NORM:
            rstd = tl.rsqrt(tl.sum(y * y, axis=0) / n + eps)
            w = tl.load(w_ptr + k, mask=mask, other=0.0)
            y = ((y * rstd).to(w.dtype) * w).to(tl.float32)  # rounded as rms_norm_kernel rounds it
        if i < 0:
            tl.store(y_ptr + k, y.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            a = tl.load(a_ptr + i * n + k, mask=mask, other=0.0).to(tl.float32)
            tl.store(h_ptr + i, tl.sum(a * y, axis=0).to(h_ptr.dtype.element_ty))

    @triton.jit
    def store_vectors_kernel(x_ptr, positions_ptr, data_ptr, scales_ptr, length, max_seq, HALF: tl.constexpr,
                             BITS: tl.constexpr, PDL: tl.constexpr):
        # Program (row, t): vector t of row `row` (one KV head of one sequence) of x [rows, length, 2 * HALF],
        # quantized into slot positions[t] of that row's cache.
        follow_previous_kernel(PDL)
        row = tl.program_id(0)
        t = tl.program_id(1)
        i = tl.arange(0, HALF)
        source = x_ptr + (row * length + t) * 2 * HALF
        store_head(data_ptr, scales_ptr, row * max_seq + tl.load(positions_ptr + t), tl.load(source + i).to(tl.float32),
                   tl.load(source + HALF + i).to(tl.float32), BITS, HALF)

    @triton.jit
    def load_slots_kernel(data_ptr, scales_ptr, out_ptr, length, max_seq, DIM: tl.constexpr, BITS: tl.constexpr,
                          BLOCK: tl.constexpr, PDL: tl.constexpr):
        # Program (row, p): slots p * BLOCK .. of row `row`'s cache, dequantized into out [rows, length, DIM].
        follow_previous_kernel(PDL)
        row = tl.program_id(0)
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = n < length
        vectors = load_vectors(data_ptr, scales_ptr, row * max_seq + n, valid, BITS, DIM, BLOCK)
        d = tl.arange(0, DIM)
        tl.store(out_ptr + (row * length + n)[:, None] * DIM + d[None, :], vectors.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None])

    @triton.jit
    def table_rows_kernel(table_ptr, ids_ptr, out_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # Program (r, p): entries p * BLOCK .. of row ids[r] of the table, into row r of out.
        follow_previous_kernel(PDL)
        r = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        row = tl.load(ids_ptr + r)
        tl.store(out_ptr + r * n + cols, tl.load(table_ptr + row * n + cols, mask=mask), mask=mask)

    return types.SimpleNamespace(
        rms_norm=rms_norm_kernel, rope_store=rope_store_kernel, silu_mul=silu_mul_kernel,
        attention_parts=attention_parts_kernel, merge_parts=merge_parts_kernel,
        low_rank_project=low_rank_project_kernel, table_rows=table_rows_kernel, store_vectors=store_vectors_kernel,
        load_slots=load_slots_kernel)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _overlaps(device: torch.device) -> bool:
    """Whether kernels on this device launch as programmatic dependents (sm_90 and later): each may start
    while the kernel before it finishes, and the 4-bit kernel after it may start loading its weights. A decode
    step is hundreds of short kernels, and this hides much of the gap between them."""
    return torch.cuda.get_device_capability(device)[0] >= 9


def _launch(kernel, grid, device: torch.device, *args, **meta) -> None:
    overlap = _overlaps(device)
    kernel[grid](*args, **meta, PDL=overlap, launch_pdl=overlap)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of x; with `residual`, (x + residual, the RMSNorm of that) from one launch: the residual
    stream's add and the norm that follows it."""
    kernel = _kernels().rms_norm
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty_like(x2)
    r2, total = (x2, x2) if residual is None else (residual.reshape(x2.shape).contiguous(), torch.empty_like(x2))
    _launch(kernel, (x2.shape[0],), x.device, x2, r2, total, weight, y, x2.shape[1], eps, ADD=residual is not None,
            BLOCK=_next_pow2(x2.shape[1]))
    return y.view(x.shape) if residual is None else (total.view(x.shape), y.view(x.shape))


def table_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The rows [*ids.shape, hidden] of an embedding table for token ids on a GPU, gathered by that GPU. The table
    may sit in pinned CPU memory, which the GPU reads over the bus: a decode step's row then crosses without
    the host knowing the id, so the step can be queued before the token that feeds it has been drawn."""
    if not (table.device == ids.device or (table.device.type == "cpu" and table.is_pinned())):
        raise ValueError("table_rows reads a table on the ids' GPU or in pinned CPU memory")
    n = table.shape[1]
    out = table.new_empty(*ids.shape, n, device=ids.device)
    _launch(_kernels().table_rows, (ids.numel(), -(-n // 1024)), ids.device, table, ids.contiguous(), out, n,
            BLOCK=1024)
    return out


def store_vectors(x: torch.Tensor, positions: torch.Tensor, cache: tuple) -> None:
    """Quantize x [batch, kv_heads, length, head_dim] into slots `positions` [length] of a quantized cache tensor,
    (data [batch, kv_heads, slots, ...], scales, bits) as cache.CacheTensor.kernel_args gives it, as cache.quantize
    would: a prompt's keys or values in one launch."""
    data, scales, bits = cache
    batch, kv_heads, length, dim = x.shape
    _launch(_kernels().store_vectors, (batch * kv_heads, length), x.device, x.contiguous(), positions, data, scales,
            length, data.shape[2], HALF=dim // 2, BITS=bits)


def load_slots(cache: tuple, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Slots 0 .. length - 1 of a quantized cache tensor (as store_vectors takes it), dequantized to dtype
    [batch, kv_heads, length, head_dim] as cache.dequantize would: what a prompt attends over."""
    data, scales, bits = cache
    batch, kv_heads, slots, packed = data.shape
    dim = packed * 8 // bits
    out = torch.empty(batch, kv_heads, length, dim, dtype=dtype, device=data.device)
    _launch(_kernels().load_slots, (batch * kv_heads, -(-length // 64)), data.device, data, scales, out, length,
            slots, DIM=dim, BITS=bits, BLOCK=64)
    return out


def unquantized(tensor: torch.Tensor) -> tuple:
    """A cache tensor in the model's dtype as the kernels take caches, (data, scales, bits): the data stands in
    for the scales, an unused pointer."""
    return tensor, tensor, 16


def rope_and_store(q, k, v, cos, sin, slot, keys, values) -> None:
    """For one position of each of `rows` sequences: rotate q [rows, q_heads, dim] in place; rotate k and store
    it and v [rows, kv_heads, dim] at `slot` (a one-element tensor) of each row's cache, keys / values
    (data [rows, kv_heads, slots, ...], scales, bits) as cache.CacheTensor.kernel_args gives them. cos and sin
    are the position's rows of the rotary tables. Rows may lie apart (views into stacked q, k and v); heads
    must be contiguous within a row."""
    kernel = _kernels().rope_store
    rows, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    if k.stride() != v.stride() or q.stride()[1:] != (dim, 1) or k.stride()[1:] != (dim, 1):
        raise ValueError("rope_and_store needs rows of contiguous heads, and k and v laid out alike")
    (keys, key_scales, key_bits), (values, value_scales, value_bits) = keys, values
    _, cache_heads, slots = keys.shape[:3]
    _launch(kernel, (rows, q_heads + kv_heads), q.device, q, k, v, cos, sin, slot, keys, key_scales, values,
            value_scales, q_heads, q.stride(0), k.stride(0), cache_heads * slots, slots, HALF=dim // 2,
            KEY_BITS=key_bits, VALUE_BITS=value_bits)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate and up side by side in gate_up [..., 2 * n]."""
    gate_up, out, n = _gate_up_and_out(gate_up)
    rows = gate_up.numel() // (2 * n)
    _launch(_kernels().silu_mul, (-(-n // 1024), rows), out.device, gate_up, out, out, out, n, 0, PROJECT=False,
            RANK=1, BLOCK=1024)
    return out


def _gate_up_and_out(gate_up: torch.Tensor):
    n = gate_up.shape[-1] // 2
    return gate_up.contiguous(), gate_up.new_empty(*gate_up.shape[:-1], n), n


# Entries per program of the projecting SiLU-multiply: enough programs that the reads of a spread over
# many multiprocessors, few enough partial sums for the 4-bit kernel to add up.
SILU_PROJECT_BLOCK = 512


def silu_mul_project(gate_up: torch.Tensor, a: torch.Tensor):
    """(out, parts) for out = silu_mul(gate_up) of one row and parts float32 [parts, ..., rank], partial sums of
    out @ a^T, in one launch: the activation and the first product of the LoRA updates of the layer that
    reads it."""
    gate_up, out, n = _gate_up_and_out(gate_up)
    rank = a.shape[0]
    programs = -(-n // SILU_PROJECT_BLOCK)
    parts = torch.empty(programs, *out.shape[:-1], rank, device=out.device, dtype=torch.float32)
    _launch(_kernels().silu_mul, (programs, 1), out.device, gate_up, out, a, parts, n, rank, PROJECT=True,
            RANK=_next_pow2(rank), BLOCK=SILU_PROJECT_BLOCK, num_warps=8)
    return out, parts


def low_rank_project(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x @ a^T in float32 for one row x [..., n] and a [rank, n] with a small rank: a LoRA update's first
    product."""
    h = x.new_empty(*x.shape[:-1], a.shape[0], dtype=torch.float32)
    _project(x, a, h)
    return h


def rms_norm_project(x: torch.Tensor, weight: torch.Tensor, eps: float, a: torch.Tensor,
                     residual: torch.Tensor | None = None):
    """(total, y, y @ a^T) for y the RMSNorm of one row x [..., n], or with `residual` of total = x + residual
    (else total is None), the product in float32, in one launch: a norm and the first product of the LoRA
    updates of the layers that read its output."""
    y, h = torch.empty_like(x), x.new_empty(*x.shape[:-1], a.shape[0], dtype=torch.float32)
    total = None if residual is None else torch.empty_like(x)
    _project(x, a, h, norm=(weight, eps, y), residual=None if residual is None else (residual.contiguous(), total))
    return total, y, h


def _project(x, a, h, norm=None, residual=None) -> None:
    rank, n = a.shape
    x = x.contiguous()
    weight, eps, y = norm if norm is not None else (x, 0.0, x)  # x stands in for the pointers left unused
    r, total = residual if residual is not None else (x, x)
    _launch(_kernels().low_rank_project, (rank + (norm is not None),), x.device, x, r, total, weight, a, y, h, n,
            eps, NORM=norm is not None, ADD=residual is not None, BLOCK=_next_pow2(n), num_warps=8)


ATTENTION_BLOCK = 64
MAX_ROWS_PER_PROGRAM = 64
MAX_SPLITS = 64


def attention_splits(kv_heads: int, row_blocks: int, max_length: int, multiprocessors: int) -> int:
    """How many parts the cache slots of each KV head and row block are split into, for a graph bucket of
    `max_length` slots.

    Long contexts take about 32 splits of 256 slots or more per KV head (fewer with many row blocks), so that
    each program streams several blocks. Short ones would then get one program per KV head, too few to use
    the GPU, each reading its blocks one after another: they take as many splits of one block each as give
    every multiprocessor two programs."""
    streaming = min(MAX_SPLITS, max_length // 256) // row_blocks
    filling = min(MAX_SPLITS, -(-2 * multiprocessors // (kv_heads * row_blocks)), max_length // ATTENTION_BLOCK)
    return max(1, streaming, filling)


def decode_attention(q, k, v, cos, sin, position, keys, values, max_length: int) -> torch.Tensor:
    """One token's step of attention: rotate its q [q_heads, dim] and k [kv_heads, dim] (heads contiguous) by
    the position's rows of the rotary tables (cos, sin), store k and v at slot `position` (a one-element
    tensor) of keys / values, each (data [kv_heads, slots, ...], scales, bits) as cache.CacheTensor.kernel_args
    gives them for one row, and attend over slots 0..position. q may come back rotated.

    `max_length` bounds the position (the graph bucket): it sets how many splits share the work
    (attention_splits).
    """
    out = q.new_empty(q.shape)
    _attention(q.unsqueeze(0), keys, values, position, 1, max_length, out.unsqueeze(0), new=(k, v, cos, sin))
    return out


def bifurcated_attention(q, context_keys, context_values, context_len, max_context: int,
                         own_keys, own_values, own_slot) -> torch.Tensor:
    """Attention of n samples, one query each (q [n, q_heads, dim], heads contiguous), over the first
    context_len slots of a context they share (keys / values as decode_attention takes them) and each sample's
    own slots 0..own_slot (own keys / values [rows >= n, kv_heads, capacity, dim], in q's dtype). context_len
    and own_slot are one-element tensors, so a captured graph follows them; max_context bounds context_len, as
    in decode_attention.

    Every sample's query rows of a KV head share one read of the context; the own slots, which are few,
    are folded in by the merge, which then divides by one softmax total over both.
    """
    out = q.new_empty(q.shape)
    own = (own_keys, own_values, own_slot, own_keys[0].numel(), own_keys.shape[2])
    _attention(q, context_keys, context_values, context_len, 0, max_context, out, own)
    return out


CACHE_ATTENTION_BLOCK_STEP = 64  # slots that the 4 warps of a cache_attention.cu block take in one step each


def cache_attention_splits(kv_heads: int, max_length: int, resident_blocks: int) -> int:
    """How many parts the slots of each KV head are split into for the 4-bit cache kernel (cache_attention.cu),
    for a graph bucket of `max_length` slots: as many as the GPU holds blocks at once, so that there is no second
    wave whose blocks would pay the memory latency again, but no more than give each warp one tile."""
    return max(1, min(MAX_SPLITS, resident_blocks // kv_heads, max_length // CACHE_ATTENTION_BLOCK_STEP))


@functools.cache
def _resident_cache_attention_blocks(device: torch.device, dim: int) -> int:
    with torch.cuda.device(device):
        return extension().cache_attention_resident_blocks(dim)


def _cache_attention_serves(q: torch.Tensor, key_bits: int, value_bits: int, rows: int) -> bool:
    """Whether the CUDA kernel for a 4-bit cache (cache_attention.cu) takes these parts: it reads 4-bit keys and
    values at memory speed where the Triton kernel is bound by unpacking them, for up to 8 float16 query rows per
    KV head and heads of 64 or 128 entries. It rotates and stores a decode step's new token itself, as the Triton
    kernel does. With that, a whole llama2-7b decode step over a 1024-slot bucket is 1.9% faster with it than on
    the Triton kernel (H200, bench/NOTES.md session 15), and longer buckets gain more."""
    return (key_bits == value_bits == 4 and rows <= 8 and q.dtype == torch.float16 and q.shape[-1] in (64, 128)
            and cuda_kernels_available())


def _attention(q, keys, values, length, length_bias: int, max_length: int, out, own=None, new=None) -> None:
    """Attention of q [n, q_heads, dim] over slots 0..length + length_bias - 1 of keys / values (data [kv_heads,
    slots, ...], scales, bits) into out [n, q_heads, dim] (contiguous); with `own`, each sample also attends over
    its own cache; with `new` (k, v, cos, sin), q of one sample and the last slot's key and value are given
    before RoPE, to be rotated and stored first, by the parts kernel itself (Triton or CUDA), which spares a
    launch. q's rows may lie apart, as views into stacked q, k and v do."""
    kernels = _kernels()
    (keys, key_scales, key_bits), (values, value_scales, value_bits) = keys, values
    samples, q_heads, dim = q.shape
    kv_heads, max_seq = keys.shape[0], keys.shape[1]
    group = q_heads // kv_heads
    rows = samples * group  # query rows per KV head
    rows_per_program = min(MAX_ROWS_PER_PROGRAM, max(16, _next_pow2(rows)))  # tl.dot needs 16 rows or more
    row_blocks = -(-rows // rows_per_program)
    on_cache_kernel = _cache_attention_serves(q, key_bits, value_bits, rows)
    if on_cache_kernel:
        splits = cache_attention_splits(kv_heads, max_length, _resident_cache_attention_blocks(q.device, dim))
    else:
        splits = attention_splits(kv_heads, row_blocks, max_length, _multiprocessors(q.device))
    part_out = torch.empty(kv_heads * splits * rows, dim, device=q.device, dtype=torch.float32)
    part_max = torch.empty(kv_heads * splits * rows, device=q.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    scale = dim**-0.5
    q_row_stride = q.stride(0)
    # Where a 4-bit cache's blocks are unpacked in registers, Triton's prefetch stages only cost: with one stage
    # a step over 8192 slots is 18% (q4) and 29% (k8v4) faster; an 8-bit cache gains 6% there but loses at
    # short contexts, so it keeps them (bench/NOTES.md, session 8).
    stages = 1 if min(key_bits, value_bits) == 4 else 3
    if on_cache_kernel:
        # A decode step's k and v are float16 rows of contiguous heads, as the kernel takes them (the binding checks).
        new_k, new_v, cos, sin = new if new is not None else (None, None, None, None)
        extension().cache_attention_parts(q, keys, key_scales, values, value_scales, length, length_bias, splits,
                                          scale, part_out, part_max, part_sum, new_k, new_v, cos, sin)
    else:
        new_k, new_v, cos, sin = new if new is not None else (q, q, q, q)  # q stands in for the pointers left unused
        _launch(kernels.attention_parts, (kv_heads, splits, row_blocks), q.device,
                q, keys, key_scales, values, value_scales, length, length_bias, part_out, part_max, part_sum, rows,
                q_row_stride, max_seq, scale, splits, new_k, new_v, cos, sin, GROUP=group, ROWS=rows_per_program,
                DIM=dim, BLOCK=ATTENTION_BLOCK, KEY_BITS=key_bits, VALUE_BITS=value_bits, NEW=new is not None,
                num_stages=stages)
    own_keys, own_values, own_slot, own_row_stride, own_capacity = own if own is not None else (q, q, length, 0, 0)
    _launch(kernels.merge_parts, (kv_heads, rows), q.device,
            part_out, part_max, part_sum, out, rows, q_row_stride, q_heads * dim, splits, q, own_keys, own_values,
            own_slot, own_row_stride, own_capacity, scale, GROUP=group, DIM=dim, SPLITS_PAD=max(2, _next_pow2(splits)),
            OWN=own is not None, BLOCK=ATTENTION_BLOCK)
