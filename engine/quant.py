"""The one internal 4-bit linear form that every checkpoint format loads into.

A weight W of shape [out, in] is stored transposed and packed, the way GPTQ packs `qweight`:

    packed  int32 [in / 8, out]   input row r of a column sits in bits 4*(r % 8) of word r // 8
    scale   float [groups, out]
    offset  float [groups, out]   W[o, r] = scale[r // group_size, o] * q[r, o] + offset[r // group_size, o]
    perm    int64 [in] or None    the layer computes x[..., perm] @ W^T

A per-group scale and offset cover GPTQ (sym and asym, offset = -scale * zero), GGUF Q4_0
(offset = -8 * d), Q4_1 (offset = m) and Q4_K (offset = -dmin * m) exactly. `perm` reorders the
input features so that act-order checkpoints, whose groups are scattered over the rows, become
contiguous groups; it is applied to the activations, which is exact and costs one gather.

The PyTorch path below is the reference that the CUDA kernels must match.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

PACK = 8  # 4-bit values per int32 word
CPU_PROMPT_ROWS = 16  # from this many rows on, CPU float16 products run in cpu_prompt_dtype()
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # bit offset of each nibble in a word


@functools.cache
def cpu_prompt_dtype() -> torch.dtype:
    """The dtype for many-row CPU products of float16 weights: bfloat16 where the CPU multiplies it
    natively, float32 elsewhere; CPU float16 matrix products are slow either way."""
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def dense_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T. On the CPU float16 is the fastest for the one-row products of decoding (it halves
    the bytes read), but products of many rows (prompts) run several times faster in another dtype."""
    if x.dtype == torch.float16 and x.device.type == "cpu" and x.shape[:-1].numel() >= CPU_PROMPT_ROWS:
        dtype = cpu_prompt_dtype()
        return F.linear(x.to(dtype), weight.to(dtype)).half()
    return F.linear(x, weight)


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """Pack integer values in 0..15 of shape [in, out] into int32 [in / 8, out]."""
    rows, cols = q.shape
    if rows % PACK:
        raise ValueError(f"cannot pack {rows} input rows: the count must be a multiple of {PACK}")
    q = q.to(torch.int32).reshape(rows // PACK, PACK, cols)
    packed = q[:, 0].clone()
    for i in range(1, PACK):
        packed |= q[:, i] << (4 * i)  # int32 wrap-around keeps bit 31 right for the last nibble
    return packed


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_rows: int32 [in / 8, out] -> uint8 [in, out] with values 0..15."""
    words, cols = packed.shape
    shifts = _SHIFTS.to(packed.device).view(1, PACK, 1)
    q = (packed.unsqueeze(1) >> shifts) & 0xF
    return q.reshape(words * PACK, cols).to(torch.uint8)


# A LoRA update's second product, which a linear layer adds to its output: (h, b) adds h @ b^T, with
# b [out, rank] and h [..., rank] shaped like the layer's input, or the partial sums of such an h
# [parts, ..., rank], as the fused one-row kernels write it (in float32).
LowRank = tuple[torch.Tensor, torch.Tensor]


def add_low_rank(y: torch.Tensor, low_rank: LowRank | None, in_place: bool = False) -> torch.Tensor:
    if low_rank is None:
        return y
    h, b = low_rank
    if h.dim() > y.dim():
        h = h.sum(0)
    update = F.linear(h.to(b.dtype), b)
    return y.add_(update) if in_place else y + update


class Q4Linear(torch.nn.Module):
    """A bias-free linear layer with 4-bit weights in the internal form described above."""

    def __init__(self, packed, scale, offset, group_size: int, perm=None):
        super().__init__()
        in_features = packed.shape[0] * PACK
        out_features = packed.shape[1]
        groups = scale.shape[0]
        if group_size * groups != in_features or scale.shape != offset.shape or scale.shape[1] != out_features:
            raise ValueError(
                f"inconsistent 4-bit layer: {in_features} inputs, {out_features} outputs, "
                f"group size {group_size}, scale {tuple(scale.shape)}, offset {tuple(offset.shape)}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.register_buffer("packed", packed.to(torch.int32).contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("offset", offset.contiguous())
        self.register_buffer("perm", None if perm is None else perm.to(torch.int64).contiguous())
        # The widths of the layers stacked into this one (`stack`), in output order; a plain layer is one.
        self.stacked_outputs = (out_features,)
        # A dequantized copy, kept when the caller trades memory for speed (the CPU path does).
        self.dense: torch.Tensor | None = None
        # The CUDA kernels' own copy of the weights (engine.cuda.q4.PreparedQ4), when they can run this layer.
        self.kernel = None

    @classmethod
    def from_values(cls, q, scale, offset, group_size, perm=None) -> "Q4Linear":
        """Build from unpacked 4-bit values q [in, out] (row r already in permuted order)."""
        return cls(pack_rows(q), scale, offset, group_size, perm)

    @classmethod
    def stack(cls, layers: list["Q4Linear"]) -> "Q4Linear | None":
        """One layer whose outputs are these layers' outputs side by side, or None where they cannot share one
        weight: their group sizes or input orders differ."""
        first = layers[0]
        for layer in layers[1:]:
            same_perm = (layer.perm is None) == (first.perm is None) and (
                layer.perm is None or torch.equal(layer.perm, first.perm))
            if layer.group_size != first.group_size or layer.in_features != first.in_features or not same_perm:
                return None
        stacked = cls(torch.cat([layer.packed for layer in layers], 1), torch.cat([layer.scale for layer in layers], 1),
                      torch.cat([layer.offset for layer in layers], 1), first.group_size, first.perm)
        stacked.stacked_outputs = tuple(width for layer in layers for width in layer.stacked_outputs)
        return stacked

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = 128) -> "Q4Linear":
        """Round-to-nearest asymmetric 4-bit quantization of a dense [out, in] weight."""
        out_features, in_features = weight.shape
        if group_size <= 0 or in_features % group_size:
            group_size = in_features
        w = weight.float().t().reshape(in_features // group_size, group_size, out_features)
        low = w.amin(dim=1)
        high = w.amax(dim=1)
        scale = ((high - low) / 15).clamp_min(1e-8)
        q = torch.round((w - low.unsqueeze(1)) / scale.unsqueeze(1)).clamp(0, 15)
        return cls.from_values(q.reshape(in_features, out_features), scale, low, group_size)

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The weight as a dense [out, in] tensor in the permuted input order."""
        dtype = dtype or self.scale.dtype
        q = unpack_rows(self.packed).to(dtype)
        groups = self.scale.shape[0]
        q = q.view(groups, self.group_size, self.out_features)
        w = q * self.scale.to(dtype).unsqueeze(1) + self.offset.to(dtype).unsqueeze(1)
        return w.reshape(self.in_features, self.out_features).t()

    def materialize(self, dtype) -> None:
        """Keep a dequantized copy in `dtype` so each call is one plain matmul."""
        self.dense = self.dequantize(torch.float32).to(dtype).contiguous()

    def use_kernel(self, kernel) -> None:
        """Hand the weights to the CUDA kernel, which applies `perm` itself; the packed form is dropped to
        save memory, so this layer can no longer dequantize in PyTorch."""
        self.kernel = kernel
        self.packed = self.scale = self.offset = None

    def forward(self, x: torch.Tensor, low_rank: LowRank | None = None) -> torch.Tensor:
        """x @ W^T, plus low_rank's product when given (in the CUDA kernel's epilogue where it runs)."""
        if self.kernel is not None:
            return self.kernel(x, low_rank=low_rank)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        weight = self.dense if self.dense is not None else self.dequantize(x.dtype)
        return add_low_rank(dense_matmul(x, weight.to(x.dtype)), low_rank)
