"""The 4-bit CUDA kernels against a float32 dequantized reference.

The layout test runs anywhere: it decodes the repacked weights the way the kernel's registers
and the PTX m16n8k16 fragment map say they are used, independently of how `repack` builds them.
The kernel tests need a CUDA GPU and skip cleanly without one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import cuda
from engine.cuda import q4
from engine.quant import Q4Linear

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_layer(in_features, out_features, group_size, act_order, generator, device="cpu") -> Q4Linear:
    """Random 4-bit values, fp16 scales and offsets; a random input permutation for act-order."""
    group_size = in_features if group_size == -1 else group_size
    groups = in_features // group_size
    q = torch.randint(0, 16, (in_features, out_features), generator=generator)
    scale = (torch.rand(groups, out_features, generator=generator) * 0.02 + 0.002).half()
    zero = torch.rand(groups, out_features, generator=generator) * 15
    offset = (-scale.float() * zero).half()
    perm = torch.randperm(in_features, generator=generator) if act_order else None
    return Q4Linear.from_values(q, scale, offset, group_size, perm).to(device)


def emulate_kernel_weights(weights: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """Dense W [out_pad, in_pad] as the kernel sees it, decoded from the repacked buffers."""
    slices, k_tiles = weights.shape[:2]
    magic = q4.group_magic(group_size)
    w = np.zeros((slices * 32, k_tiles * 64), np.float32)
    words = weights.astype(np.int64) & 0xFFFFFFFF
    for s in range(slices):
        for kt in range(k_tiles):
            for tile in range(2):
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    base = kt * 64 + 16 * t
                    group = (base * magic) >> 32
                    s0, o0, s1, o1 = scales[s, group, g, 4 * tile : 4 * tile + 4].astype(np.float32)
                    for j in range(4):
                        word = int(words[s, kt, tile, lane, j])
                        # The kernel's decode: register r = nibbles (r, r + 4) as (low, high) half;
                        # registers 1 and 3 from the 4-bit-shifted mask, 2 and 3 from word >> 8.
                        for i in range(8):
                            reg, half = i % 4, i // 4
                            value = (word >> (4 * i)) & 0xF
                            # A fragment (PTX m16n8k16 .f16): reg 0 = (g, 2t..), 1 = (g+8, 2t..),
                            # 2 = (g, 2t+8..), 3 = (g+8, 2t+8..); the kernel's B operand maps mma
                            # column 2t + e to input base + 4j + e and 2t + 8 + e to base + 4j + 2 + e.
                            row = s * 32 + tile * 16 + g + (8 if reg % 2 else 0)
                            col = base + 4 * j + half + (2 if reg >= 2 else 0)
                            scale, off = (s1, o1) if reg % 2 else (s0, o0)
                            w[row, col] = scale * value + off
    return w


@pytest.mark.parametrize(("in_features", "out_features", "group_size"), [(136, 40, 8 * 17), (192, 33, 32), (128, 48, 64)])
def test_repack_layout_matches_the_kernel_fragment_map(in_features, out_features, group_size):
    gen = torch.Generator().manual_seed(in_features + out_features)
    layer = random_layer(in_features, out_features, group_size, act_order=False, generator=gen)
    prepared_w, prepared_s = q4.repack(layer.packed, layer.scale, layer.offset, layer.group_size)
    dense = emulate_kernel_weights(prepared_w.numpy(), prepared_s.numpy(), layer.group_size)
    want = layer.dequantize(torch.float32).numpy()
    np.testing.assert_array_equal(dense[:out_features, :in_features], want)
    assert not dense[out_features:].any(), "padding outputs must be zero"


def test_fallback_warning_is_one_line_once(capsys, monkeypatch):
    monkeypatch.setattr(cuda.build, "unavailable_reason", lambda: "no CUDA GPU is visible")
    cuda.build.warn_fallback.cache_clear()
    cuda.warn_fallback()
    cuda.warn_fallback()
    cuda.build.warn_fallback.cache_clear()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU is visible" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_unavailable_without_gpu():
    assert not cuda.available()
    assert "GPU" in cuda.unavailable_reason()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def reference(layer: Q4Linear, x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    if layer.perm is not None:
        x = x[..., layer.perm]
    return x @ layer.dequantize(torch.float32).double().t()


LAYERS = [
    # in, out, group size (-1: one group per row), act-order
    (4096, 4104, 128, False),
    (4160, 1000, 64, True),
    (1088, 1000, 32, False),
    (960, 200, 48, False),  # a group size that is not a power of two
    (2056, 520, -1, True),  # 2056 inputs: not a multiple of 16 or 64
    (11008, 4096, 128, True),  # too wide to stage 16 rows: perm is gathered by a separate pass
]
ROWS = [1, 2, 3, 5, 8, 9, 13, 16, 17, 40]


@needs_gpu
@pytest.mark.parametrize(("in_features", "out_features", "group_size", "act_order"), LAYERS)
def test_matmul_matches_float32_reference(in_features, out_features, group_size, act_order):
    ext = cuda.extension()  # a build failure on a GPU machine is a test failure, not a skip
    gen = torch.Generator().manual_seed(in_features * 7 + out_features)
    layer = random_layer(in_features, out_features, group_size, act_order, gen, device="cuda")
    prepared = q4.prepare(layer)
    staged_row_bytes = (-(-in_features // q4.STEP_K) * q4.STEP_K + 8) * 2
    for rows in ROWS:
        x = torch.randn(rows, in_features, generator=gen).half().cuda()
        # 0: the kernel's choice; 1: x from global memory; 2: x staged in shared memory, if it fits.
        fits = rows * staged_row_bytes <= ext.max_staged_bytes(rows, 0, 1, prepared.folded)
        modes = (0, 1, 2) if fits else (0, 1)
        for mode in modes:
            out = torch.full((rows, out_features), float("nan"), dtype=torch.float16, device="cuda")
            try:
                prepared.matmul(x, out, mode=mode)
            except RuntimeError as error:
                pytest.fail(f"rows={rows} mode={mode}: {error}")
            err = relative_error(out, reference(layer, x))
            assert err < 2e-3, f"rows={rows} mode={mode}: relative error {err:.2e}"


@needs_gpu
@pytest.mark.parametrize("rows", [1, 2, 8])
def test_folded_path_keeps_its_precision_for_inputs_far_from_zero(rows):
    """The folded path (group size 128, up to 8 rows) multiplies x by 1024 + q and takes 1024 sum(x) back out in
    float32; inputs that share a large mean make that bias largest against the result."""
    ext = cuda.extension()
    gen = torch.Generator().manual_seed(rows)
    layer = random_layer(4096, 1032, 128, False, gen, device="cuda")
    prepared = q4.prepare(layer)
    assert prepared.folded
    x = (torch.randn(rows, 4096, generator=gen) * 0.5 + 4).half().cuda()
    fits = rows * (4096 + 8) * 2 <= ext.max_staged_bytes(rows, 0, 1, True)
    for mode in (1, 2) if fits else (1,):
        out = torch.full((rows, 1032), float("nan"), dtype=torch.float16, device="cuda")
        prepared.matmul(x, out, mode=mode)
        err = relative_error(out, reference(layer, x))
        assert err < 2e-3, f"mode={mode}: relative error {err:.2e}"


@needs_gpu
def test_matmul_keeps_leading_dimensions():
    gen = torch.Generator().manual_seed(5)
    layer = random_layer(512, 272, 128, True, gen, device="cuda")
    x = torch.randn(2, 3, 512, generator=gen).half().cuda()
    y = q4.prepare(layer).matmul(x)
    assert y.shape == (2, 3, 272)
    assert relative_error(y, reference(layer, x)) < 2e-3


@needs_gpu
@pytest.mark.parametrize("rows", [1, 7, 16, 17])
@pytest.mark.parametrize("in_features, out_features, first, rank", [
    (1088, 520, 8, 16),  # fewer weight steps per slice than ring stages: the epilogue waits for its factors
    (4096, 11008, 16, 32),  # blocks that compute several slices restage b for each
    (1088, 520, 3, 12),  # a rank and an offset the epilogue cannot copy 16 bytes at a time: a separate product
])
# Group size 64 takes the per-weight path; one group per row (-1) takes the folded one up to 8 rows.
@pytest.mark.parametrize("group_size", [64, -1])
def test_matmul_adds_a_low_rank_update_in_its_epilogue(rows, in_features, out_features, first, rank, group_size):
    """y = x[:, perm] @ W^T + h @ b^T, with h a column slice of a wider product as a LoRA layer passes it."""
    gen = torch.Generator().manual_seed(rows)
    layer = random_layer(in_features, out_features, group_size, True, gen, device="cuda")
    x = torch.randn(rows, in_features, generator=gen).half().cuda()
    product = torch.randn(rows, first + rank + 16, generator=gen).half().cuda()
    h, b = product[:, first:first + rank], (torch.randn(out_features, rank, generator=gen) * 0.1).half().cuda()
    out = torch.full((rows, out_features), float("nan"), dtype=torch.float16, device="cuda")
    q4.prepare(layer).matmul(x, out, low_rank=(h, b))
    expected = reference(layer, x) + h.double() @ b.double().t()
    assert relative_error(out, expected) < 2e-3


def random_stack(in_features, width, group_size, act_order, generator, device="cpu") -> Q4Linear:
    """A stack of two random layers of `width` outputs sharing one input order, like SwiGLU's gate and up."""
    gate = random_layer(in_features, width, group_size, act_order, generator, device)
    up = random_layer(in_features, width, group_size, False, generator, device)
    up.perm = gate.perm
    return Q4Linear.stack([gate, up])


def test_paired_halves_sit_side_by_side_in_each_slice():
    """A stack of two equal layers is stored paired: prepared output 32s + 16h + o is output h n + 16s + o."""
    gen = torch.Generator().manual_seed(11)
    stack = random_stack(256, 48, 64, False, gen)
    assert q4.pairs_halves(stack) and not q4.pairs_halves(random_layer(256, 96, 64, False, gen))
    assert not q4.pairs_halves(Q4Linear.stack([random_layer(256, 40, 64, False, gen)] * 2))  # 40: not whole tiles
    order = q4.paired_order(stack.out_features)
    weights, scales = q4.repack(stack.packed[:, order], stack.scale[:, order], stack.offset[:, order], 64)
    dense = emulate_kernel_weights(weights.numpy(), scales.numpy(), 64)
    want = stack.dequantize(torch.float32).numpy()
    for prepared in range(96):
        s, h, o = prepared // 32, prepared % 32 // 16, prepared % 16
        np.testing.assert_array_equal(dense[prepared, :256], want[h * 48 + 16 * s + o])


@needs_gpu
@pytest.mark.parametrize(("in_features", "width", "group_size", "act_order"), [
    (4096, 11008, 128, False),  # Llama-2-7B's gate and up: blocks take several slices
    (1088, 2064, 32, True),  # the per-weight path; 4128 outputs: the many-row path dequantizes two parts
    (2056, 48, -1, True),  # one group per row and act-order, inputs not a multiple of 64, 3 slices
])
def test_paired_halves_give_the_stack_its_own_output_order(in_features, width, group_size, act_order):
    """Pairing is invisible to callers: y, with or without a LoRA update, is in the stack's order at any row count."""
    gen = torch.Generator().manual_seed(in_features + width)
    stack = random_stack(in_features, width, group_size, act_order, gen, device="cuda")
    prepared = q4.prepare(stack)
    assert prepared.paired
    b = (torch.randn(2 * width, 16, generator=gen) * 0.1).half().cuda()
    for rows in (1, 5, 16, 17):
        x = torch.randn(rows, in_features, generator=gen).half().cuda()
        h = torch.randn(rows, 16, generator=gen).half().cuda()
        for low_rank in (None, (h, b)):
            out = torch.full((rows, 2 * width), float("nan"), dtype=torch.float16, device="cuda")
            prepared.matmul(x, out, low_rank=low_rank)
            expected = reference(stack, x)
            if low_rank is not None:
                expected += h.double() @ b.double().t()
            err = relative_error(out, expected)
            assert err < 2e-3, f"rows={rows} lora={low_rank is not None}: relative error {err:.2e}"


@needs_gpu
@pytest.mark.parametrize(("in_features", "width", "group_size", "act_order"), [
    (4096, 11008, 128, False),
    (1088, 96, 32, False),
    (2056, 48, -1, True),
])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16])
def test_gated_matmul_computes_swiglu_in_its_epilogue(in_features, width, group_size, act_order, rows):
    """y = silu(x @ gate^T) * (x @ up^T) from the paired stack of gate and up, against float64 products of the
    float32 dequantized weights, with x read from global memory and staged in shared memory."""
    ext = cuda.extension()
    gen = torch.Generator().manual_seed(in_features + rows)
    stack = random_stack(in_features, width, group_size, act_order, gen, device="cuda")
    prepared = q4.prepare(stack)
    x = torch.randn(rows, in_features, generator=gen).half().cuda()
    gate, up = reference(stack, x).split(width, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    fits = rows * (-(-in_features // q4.STEP_K) * q4.STEP_K + 8) * 2 <= ext.max_staged_bytes(rows, 0, 1,
                                                                                            prepared.folded)
    assert prepared.gates(x)
    for mode in (1, 2) if fits else (1,):
        out = torch.full((rows, width), float("nan"), dtype=torch.float16, device="cuda")
        prepared.matmul(x, out, gated=True, mode=mode)
        err = relative_error(out, expected)
        assert err < 2e-3, f"mode={mode}: relative error {err:.2e}"


@needs_gpu
def test_gated_matmul_refuses_what_its_epilogue_cannot_do():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 256, generator=gen).half().cuda()
    unpaired = q4.prepare(random_layer(256, 96, 128, False, gen, device="cuda"))
    assert not unpaired.paired and not unpaired.gates(x)
    with pytest.raises(ValueError, match="gated product"):
        unpaired.matmul(x, gated=True)
    paired = q4.prepare(random_stack(256, 64, 128, False, gen, device="cuda"))
    assert paired.gates(x) and not paired.gates(torch.randn(17, 256).half().cuda())
    with pytest.raises(ValueError, match="gated product"):
        paired.matmul(torch.randn(17, 256).half().cuda(), gated=True)
    with pytest.raises(ValueError, match="gated product"):
        paired.matmul(x, gated=True, low_rank=(torch.zeros(1, 8).cuda(), torch.zeros(128, 8).half().cuda()))
