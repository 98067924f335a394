"""The fused Triton decode kernels against the PyTorch path they replace, on random inputs."""

import pytest
import torch
import torch.nn.functional as F

from engine.cache import (KV_CACHE_KINDS, QUANT_GROUP, CacheTensor, KVCache, bifurcated_attention,
                          grouped_attention)
from engine.model import apply_rope, attention_bias

fused = pytest.importorskip("engine.cuda.fused")
pytestmark = pytest.mark.skipif(not fused.available(), reason="needs a CUDA GPU and Triton")

CUDA = torch.device("cuda")


def relative_error(ours, reference):
    return ((ours.float() - reference.float()).norm() / reference.float().norm()).item()


def norm_reference(x, weight):
    xf = x.double()
    return weight.double() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5))


@pytest.mark.parametrize("width", [576, 4096, 5120])
def test_rms_norm(width):
    x = torch.randn(3, width, device=CUDA, dtype=torch.float16)
    weight = torch.rand(width, device=CUDA, dtype=torch.float16) + 0.5
    assert relative_error(fused.rms_norm(x, weight, 1e-5), norm_reference(x, weight)) < 2e-3


@pytest.mark.parametrize("width", [576, 4096])
def test_rms_norm_with_the_residual_add(width):
    x, residual = (torch.randn(3, 1, width, device=CUDA, dtype=torch.float16) for _ in range(2))
    weight = torch.rand(width, device=CUDA, dtype=torch.float16) + 0.5
    total, y = fused.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(total, x + residual)  # the stream is exactly what the eager add writes
    assert relative_error(y, norm_reference(x + residual, weight)) < 2e-3


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_project(with_residual):
    width, rank = 4096, 24
    x, residual = (torch.randn(1, 1, width, device=CUDA, dtype=torch.float16) for _ in range(2))
    weight = torch.rand(width, device=CUDA, dtype=torch.float16) + 0.5
    a = torch.randn(rank, width, device=CUDA, dtype=torch.float16) * width**-0.5
    total, y, h = fused.rms_norm_project(x, weight, 1e-5, a, residual if with_residual else None)
    stream = x + residual if with_residual else x
    assert (total is None) != with_residual and (total is None or torch.equal(total, stream))
    assert relative_error(y, norm_reference(stream, weight)) < 2e-3
    assert h.dtype == torch.float32 and relative_error(h, norm_reference(stream, weight) @ a.double().t()) < 2e-3


@pytest.mark.parametrize("rows,width", [(1, 11008), (3, 1536), (5, 1000)])
def test_silu_mul(rows, width):
    gate_up = torch.randn(rows, 1, 2 * width, device=CUDA, dtype=torch.float16)
    gate, up = gate_up.float().chunk(2, dim=-1)
    assert relative_error(fused.silu_mul(gate_up), F.silu(gate) * up) < 2e-3


@pytest.mark.parametrize("rank,width", [(16, 11008), (40, 14336), (3, 1536)])
def test_silu_mul_project(rank, width):
    gate_up = torch.randn(1, 1, 2 * width, device=CUDA, dtype=torch.float16)
    a = torch.randn(rank, width, device=CUDA, dtype=torch.float16) * width**-0.5
    out, parts = fused.silu_mul_project(gate_up, a)
    gate, up = gate_up.float().chunk(2, dim=-1)
    reference = F.silu(gate) * up
    assert relative_error(out, reference) < 2e-3
    assert parts.dtype == torch.float32 and parts.shape[1:] == (1, 1, rank) and parts.shape[0] > 1
    assert relative_error(parts.sum(0), out.double() @ a.double().t()) < 2e-3


def rotary_row(dim):
    angles = torch.rand(1, dim // 2, device=CUDA) * 6.28
    return torch.cat((angles, angles), -1).cos().half(), torch.cat((angles, angles), -1).sin().half()


def filled_cache(kv_heads, dim, slots, length, kind, batch=1):
    """A cache of `kind` on the GPU whose first `length` slots hold random keys and values, written by the
    eager path, and whose other slots hold NaN (or bytes that decode to NaN): a kernel must not read them."""
    cache = KVCache(kv_heads, dim, slots, torch.float16, CUDA, batch=batch, kind=kind)
    for part in (cache.keys, cache.values):
        part.data.fill_(float("nan") if part.scales is None else 0)
        if part.scales is not None:
            part.scales.fill_(float("nan"))
    if length:
        history = torch.randn(2, batch, kv_heads, length, dim, device=CUDA, dtype=torch.float16)
        cache.write(history[0], history[1], torch.arange(length, device=CUDA), length)
    return cache


def attention_over_the_cache(q, cache, length):
    """Float32 attention of q [samples, heads, dim] over what the cache's first `length` slots hold."""
    samples = q.shape[0]
    keys, values = (part.read(length).float().expand(samples, -1, -1, -1) for part in (cache.keys, cache.values))
    return grouped_attention(q.float().unsqueeze(2), keys, values, torch.zeros(1, length, device=CUDA))


def assert_stored_as_the_eager_path_stores(part, slot, x):
    """The kernel's stored entries x [kv_heads, dim] at `slot` of one row's cache. Quantized: against the eager
    path's quantizing of the same rounded x, the same levels but for rare one-level ties (the kernel's rotation
    may round differently in the last bit)."""
    ours = part.read(slot + 1)[0, :, slot].float()
    if part.bits is None:
        assert relative_error(ours, x) < 2e-3
        return
    reference = CacheTensor((1, x.shape[0], 1, x.shape[1]), part.bits, torch.float16, "cpu")  # PyTorch's quantizing
    reference.write(x.half().cpu()[None, :, None], torch.zeros(1, dtype=torch.long))
    expected = reference.read(1)[0, :, 0].float().to(CUDA)
    level = reference.scales[0, :, 0, :, 0].float().repeat_interleave(QUANT_GROUP, -1).to(CUDA)
    off = (ours - expected).abs() > 1e-3 * expected.abs().max()
    assert off.float().mean() < 0.01 and ((ours - expected).abs() <= level * 1.01 + 1e-3)[off].all()


def new_token(heads, kv_heads, dim):
    """A token's q, k and v before RoPE, the rotary rows of its position, and q and k rotated in float32."""
    q, k, v = (torch.randn(n, dim, device=CUDA, dtype=torch.float16) for n in (heads, kv_heads, kv_heads))
    cos, sin = rotary_row(dim)
    return q, k, v, cos, sin, apply_rope(q.float(), cos.float(), sin.float()), apply_rope(k.float(), cos.float(),
                                                                                          sin.float())


@pytest.mark.parametrize("kind", list(KV_CACHE_KINDS))
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (32, 8, 128)])
def test_rope_and_store(heads, kv_heads, dim, kind):
    """One token's rotation (q in place) and cache write; a quantized cache's entries against the eager
    quantizing."""
    position = 700
    cache = filled_cache(kv_heads, dim, 1024, position, kind)
    q, k, v, cos, sin, q_ref, k_ref = new_token(heads, kv_heads, dim)
    pos = torch.tensor([position], device=CUDA)
    fused.rope_and_store(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), cos, sin, pos, cache.keys.kernel_args(),
                         cache.values.kernel_args())
    assert relative_error(q, q_ref) < 2e-3
    assert_stored_as_the_eager_path_stores(cache.keys, position, k_ref)
    assert_stored_as_the_eager_path_stores(cache.values, position, v.float())


@pytest.mark.parametrize("kind", list(KV_CACHE_KINDS))
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (32, 32, 128), (32, 8, 128), (32, 2, 64)])
# The new slot: the first, the first of a block of 64 slots, the last of one, and one inside a long context.
@pytest.mark.parametrize("position", [0, 64, 127, 700])
def test_decode_attention_rotates_stores_and_attends(heads, kv_heads, dim, kind, position):
    """One token's step from q, k and v before RoPE: k and v stored at the position, and the attention over
    slots 0..position against the float32 PyTorch reference over what the cache then holds, whether the slots
    are split among few programs (a bucket of the length) or many (a bucket of 1024). A 4-bit cache goes through
    the CUDA kernel up to 8 query rows per KV head and through the Triton kernel past that (32 heads on 2)."""
    for bucket in (position + 1, 1024):
        cache = filled_cache(kv_heads, dim, 1024, position, kind)
        q, k, v, cos, sin, q_ref, k_ref = new_token(heads, kv_heads, dim)
        out = fused.decode_attention(q, k, v, cos, sin, torch.tensor([position], device=CUDA),
                                     cache.keys.kernel_args(0), cache.values.kernel_args(0), bucket)
        assert_stored_as_the_eager_path_stores(cache.keys, position, k_ref)
        assert_stored_as_the_eager_path_stores(cache.values, position, v.float())
        out_ref = attention_over_the_cache(q_ref.view(1, heads, dim), cache, position + 1)
        err = relative_error(out.view(1, heads, 1, dim), out_ref)
        assert err < 2e-3, f"bucket {bucket}: relative error {err:.2e}"


@pytest.mark.parametrize("kind", ["full", "k8v4", "q4"])
@pytest.mark.parametrize("samples,heads,kv_heads,dim", [(1, 32, 32, 128), (16, 32, 32, 128), (100, 32, 8, 128),
                                                        (3, 9, 3, 64)])
def test_bifurcated_attention(samples, heads, kv_heads, dim, kind):
    """n samples' rotation and own-slot write, then attention over the shared context (a cache of `kind`) plus
    their own slots, against the float32 PyTorch reference; slots past either length hold NaN, which must not
    be read."""
    context_len, max_context, own_slot, capacity = 3000, 4096, 37, 64
    context = filled_cache(kv_heads, dim, max_context, context_len, kind)
    own_keys = torch.randn(samples + 2, kv_heads, capacity, dim, device=CUDA, dtype=torch.float16)
    own_values = torch.randn_like(own_keys)
    # q, k and v are views into one stacked row per sample, as the model's q, k, v stack writes them.
    qkv = torch.randn(samples, (heads + 2 * kv_heads) * dim, device=CUDA, dtype=torch.float16)
    q, k, v = (t.unflatten(-1, (-1, dim)) for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1))
    cos, sin = rotary_row(dim)

    q_ref = apply_rope(q.float(), cos.float(), sin.float())
    k_ref = apply_rope(k.float(), cos.float(), sin.float())
    own_keys_ref, own_values_ref = own_keys[:samples].float(), own_values[:samples].float()
    own_keys_ref[:, :, own_slot], own_values_ref[:, :, own_slot] = k_ref, v.float()
    bias = lambda length, size: torch.where(torch.arange(size, device=CUDA) < length, 0.0, float("-inf"))
    out_ref = bifurcated_attention(q_ref.unsqueeze(2), context.keys.read(context_len)[0].float(),
                                   context.values.read(context_len)[0].float(), bias(context_len, context_len),
                                   own_keys_ref, own_values_ref, bias(own_slot + 1, capacity))

    own_keys[:, :, own_slot:] = float("nan")
    own_values[:, :, own_slot:] = float("nan")
    slot = torch.tensor([own_slot], device=CUDA)
    fused.rope_and_store(q, k, v, cos, sin, slot, fused.unquantized(own_keys), fused.unquantized(own_values))
    assert relative_error(own_keys[:samples, :, own_slot], k_ref) < 2e-3
    out = fused.bifurcated_attention(q, context.keys.kernel_args(0), context.values.kernel_args(0),
                                     torch.tensor([context_len], device=CUDA), max_context, own_keys, own_values, slot)
    assert relative_error(out, out_ref.squeeze(2)) < 2e-3


def ceil_div(a, b):
    return -(-a // b)


def cache_kernel():
    """The compiled extension with the 4-bit cache attention, or a skip."""
    from engine.cuda import build

    if not build.available():
        pytest.skip(f"the CUDA extension is not available: {build.unavailable_reason()}")
    return build.extension()


def merged_cache_attention_parts(q, cache, length, splits):
    """The CUDA kernel's parts over a 4-bit cache, merged here in float64 into [samples, heads, 1, dim], and the
    parts' (out, max, sum) by [kv_heads, splits, rows]. The part buffers start as NaN."""
    kernel = cache_kernel()
    samples, heads, dim = q.shape
    kv_heads = cache.keys.data.shape[1]
    group = heads // kv_heads
    rows = samples * group
    part_out = torch.full((kv_heads * splits * rows, dim), float("nan"), device=CUDA)
    part_max = torch.full((kv_heads * splits * rows,), float("nan"), device=CUDA)
    part_sum = torch.full_like(part_max, float("nan"))
    (keys, key_scales, _), (values, value_scales, _) = cache.keys.kernel_args(0), cache.values.kernel_args(0)
    kernel.cache_attention_parts(q, keys, key_scales, values, value_scales, torch.tensor([length - 1], device=CUDA),
                                 1, splits, dim**-0.5, part_out, part_max, part_sum, None, None, None, None)

    part_out = part_out.double().view(kv_heads, splits, rows, dim)
    part_max, part_sum = (part.double().view(kv_heads, splits, rows) for part in (part_max, part_sum))
    weights = torch.where(part_max == float("-inf"), 0.0, (part_max - part_max.amax(1, keepdim=True)).exp())
    out = (part_out * weights[..., None]).sum(1) / (part_sum * weights).sum(1)[..., None]
    # Query row r of KV head h is head h * group + r % group of sample r // group.
    out = out.view(kv_heads, samples, group, dim).permute(1, 0, 2, 3).reshape(samples, heads, 1, dim)
    return out, (part_out, part_max, part_sum)


@pytest.mark.parametrize("samples,heads,kv_heads,dim", [(1, 32, 32, 128), (1, 32, 8, 128), (1, 9, 3, 64),
                                                        (2, 8, 2, 64)])
@pytest.mark.parametrize("length,splits", [(1, 1), (37, 3), (700, 7), (3001, 32), (100, 64)])
def test_4bit_cache_attention_parts(samples, heads, kv_heads, dim, length, splits):
    """The CUDA kernel's parts over a 4-bit cache, merged, against float32 attention over what the cache holds
    (slots past the length hold bytes that decode to NaN). Splits with no slots (the 64 splits of 100 slots take
    16 each) must come out empty: -inf, 0 and zeros."""
    cache = filled_cache(kv_heads, dim, length + 21, length, "q4")
    q = torch.randn(samples, heads, dim, device=CUDA, dtype=torch.float16)
    out, (part_out, part_max, part_sum) = merged_cache_attention_parts(q, cache, length, splits)
    assert relative_error(out, attention_over_the_cache(q, cache, length)) < 2e-3

    per_split = ceil_div(ceil_div(length, splits), 16) * 16  # the length over the splits in whole tiles of 16 slots
    filled = ceil_div(length, per_split)
    assert (part_max[:, filled:] == float("-inf")).all() and (part_sum[:, filled:] == 0).all()
    assert (part_out[:, filled:] == 0).all()
    assert torch.isfinite(part_max[:, :filled]).all()


@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 32, 128), (8, 2, 64)])
def test_4bit_cache_attention_parts_follow_scores_that_keep_rising(heads, kv_heads, dim):
    """Each slot's key leans further toward q than the last, so that a split's scores climb ~200 over its slots, past
    the kernel's softmax reference again and again: every move rescales what a warp has summed so far."""
    length, splits = 3001, 4
    q = torch.randn(1, heads, dim, device=CUDA, dtype=torch.float16)
    toward_q = q[0].view(kv_heads, heads // kv_heads, dim).float().mean(1)
    toward_q = toward_q / toward_q.norm(dim=-1, keepdim=True) * dim**0.5 / q[0].float().norm(dim=-1).mean()
    lean = torch.arange(length, device=CUDA) % (length // splits + 1) * (200 / (length // splits))
    keys = torch.randn(1, kv_heads, length, dim, device=CUDA) + lean[:, None] * toward_q[None, :, None, :]
    values = torch.randn(1, kv_heads, length, dim, device=CUDA)
    cache = KVCache(kv_heads, dim, length + 21, torch.float16, CUDA, kind="q4")
    cache.write(keys.half(), values.half(), torch.arange(length, device=CUDA), length)
    out, _ = merged_cache_attention_parts(q, cache, length, splits)
    assert relative_error(out, attention_over_the_cache(q, cache, length)) < 2e-3


def test_decode_over_a_4bit_cache_takes_the_cuda_kernel_where_it_serves(monkeypatch):
    """One token's attention over a q4 cache goes through the CUDA kernel, which rotates and stores the token
    itself, in a short bucket and a long one (one call each, the right output); many samples' rows (16 per KV
    head here) go through the Triton kernel, which shares a read among up to 64."""
    kernel = cache_kernel()
    calls = []
    launch = kernel.cache_attention_parts
    monkeypatch.setattr(kernel, "cache_attention_parts", lambda *args: calls.append(1) or launch(*args))
    heads, dim, length, bucket = 32, 128, 300, 2048
    for max_length, expected_calls in ((bucket, [1]), (length, [1, 1])):
        cache = filled_cache(heads, dim, bucket, length - 1, "q4")
        q, k, v, cos, sin, q_ref, _ = new_token(heads, heads, dim)
        out = fused.decode_attention(q, k, v, cos, sin, torch.tensor([length - 1], device=CUDA),
                                     cache.keys.kernel_args(0), cache.values.kernel_args(0), max_length)
        out_ref = attention_over_the_cache(q_ref.view(1, heads, dim), cache, length)
        assert calls == expected_calls and relative_error(out.view(1, heads, 1, dim), out_ref) < 2e-3

    samples = 16
    own = torch.randn(samples, heads, 8, dim, device=CUDA, dtype=torch.float16)
    fused.bifurcated_attention(q.expand(samples, -1, -1).contiguous(), cache.keys.kernel_args(0),
                               cache.values.kernel_args(0), torch.tensor([length], device=CUDA), bucket, own, own,
                               torch.tensor([0], device=CUDA))
    assert calls == [1, 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,start", [(9, 3, 0), (9, 3, 300), (32, 32, 0), (32, 32, 300), (32, 8, 300)])
def test_prompt_attention_matches_the_cpu_reference(heads, kv_heads, start, dtype):
    """A prompt chunk of 200 tokens at positions start.. over the cache: plain causal from position 0, masked
    after that, with grouped heads either way."""
    length, dim = 200, 64
    q = torch.randn(1, heads, length, dim, dtype=dtype)
    keys, values = (torch.randn(1, kv_heads, start + length, dim, dtype=dtype) for _ in range(2))
    bias = None if start == 0 else attention_bias(torch.arange(start, start + length), start + length)
    reference = grouped_attention(q.double(), keys.double(), values.double(), bias)
    out = grouped_attention(q.to(CUDA), keys.to(CUDA), values.to(CUDA), None if bias is None else bias.to(CUDA))
    assert relative_error(out.cpu(), reference) < 2e-3


@pytest.mark.parametrize("rank,width", [(16, 4096), (48, 4096), (5, 11008), (3, 576)])
def test_low_rank_project(rank, width):
    x = torch.randn(1, 1, width, device=CUDA, dtype=torch.float16)
    a = torch.randn(rank, width, device=CUDA, dtype=torch.float16) * width**-0.5
    reference = x.double() @ a.double().t()
    assert relative_error(fused.low_rank_project(x, a), reference) < 2e-3


@pytest.mark.parametrize("width", [576, 4096, 5000])
def test_table_rows_reads_a_pinned_table_in_cpu_memory(width):
    table = torch.randn(1000, width, dtype=torch.float16).pin_memory()
    ids = torch.randint(0, 1000, (5, 1), device=CUDA)
    ids[0, 0] = 999  # the last row: the reads must reach the end of the table
    rows = fused.table_rows(table, ids)
    assert rows.device.type == "cuda" and rows.shape == (5, 1, width)
    assert torch.equal(rows.cpu(), table[ids.cpu()])
    with pytest.raises(ValueError, match="pinned"):
        fused.table_rows(torch.randn(10, width, dtype=torch.float16), ids)


@pytest.mark.parametrize("kind", ["q8", "k8v4", "q4"])
def test_a_prompt_fills_and_reads_a_quantized_cache_as_pytorch_does(kind):
    # A prompt's many positions in one launch each way, against cache.quantize and dequantize on the CPU: the
    # same bytes stored, in slots out of order over two sequences, and the same entries read back.
    batch, kv_heads, slots, dim, length = 2, 3, 300, 128, 200
    x = torch.randn(batch, kv_heads, length, dim, dtype=torch.float16) * 3
    positions = torch.randperm(slots, generator=torch.Generator().manual_seed(0))[:length]
    for bits in set(KV_CACHE_KINDS[kind]):
        ours = CacheTensor((batch, kv_heads, slots, dim), bits, torch.float16, CUDA)
        reference = CacheTensor((batch, kv_heads, slots, dim), bits, torch.float16, "cpu")
        ours.write(x.to(CUDA), positions.to(CUDA))
        reference.write(x, positions)
        assert torch.equal(ours.data.cpu(), reference.data) and torch.equal(ours.scales.cpu(), reference.scales)
        read = ours.read(250)
        assert read.shape == (batch, kv_heads, 250, dim)
        torch.testing.assert_close(read.cpu(), reference.read(250), rtol=2e-3, atol=1e-3)
