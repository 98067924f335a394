"""4-bit linear layers on the GPU: repack a Q4Linear once at load time, then multiply.

Layout (q4_kernels.cu reads it; the two change together). Outputs are padded to a multiple of 32
and inputs to a multiple of 128 (a kernel step's two input tiles); padding weights are 0 and padding
activations are 0.

    weights  int32 [out/32, in/64, 2, 32, 4]  slice s, input tile k, tile h: outputs 32s + 16h ..
                                               32s + 16h + 15, inputs 64k .. 64k + 63
    scales   fp16  [out/32, groups', 8, 8]    group i, lane group g: (scale, offset) of outputs
                                               32s + g, 32s + g + 8, 32s + 16 + g, 32s + 24 + g

In a tile, lane l = 4g + t owns outputs o0 = g, o1 = g + 8 (of the tile) and the 16 inputs
b = 64k + 16t .. b + 15, so all of a lane's weights of one output share one group (group sizes are
multiples of 16). Word j holds inputs b + 4j .. b + 4j + 3; its nibble i (bits 4i..4i+3) is
output o0 for even i, o1 for odd i, and input b + 4j + [0, 0, 2, 2, 1, 1, 3, 3][i]: the order in
which `mask | 0x6400` turns nibble pairs into the half2 A fragments of an m16n8k16 mma.
The group of input k is umulhi(k, ceil(2**32 / group_size)), exact while padded_in * group_size
<= 2**32; groups' adds zero groups to cover the padded inputs.

A stack of two layers of equal width n, a multiple of 16 (SwiGLU's gate and up), is stored paired: the
outputs above are then, slice by slice, 16 outputs of the first layer and the same 16 of the second
(prepared output 32s + 16h + o is output h n + 16s + o of the stack). Each slice then holds both inputs
of 16 activations, which the kernel can compute in its epilogue; y keeps the stack's order either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..quant import LowRank, Q4Linear, add_low_rank, unpack_rows
from .build import extension

SLICE_N = 32  # outputs per kernel step: two tiles of 16
TILE_K = 64
STEP_K = 2 * TILE_K  # inputs per kernel step: inputs are padded to a multiple
MAX_KERNEL_ROWS = 16  # more rows: dequantize once and let cuBLAS multiply


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def group_magic(group_size: int) -> int:
    return -(-(1 << 32) // group_size)


def unsupported_reason(layer: Q4Linear) -> str | None:
    """Why the kernels cannot run this layer, or None."""
    if layer.group_size % 16 and layer.group_size != layer.in_features:
        return f"group size {layer.group_size} is not a multiple of 16"
    if _ceil_to(layer.in_features, STEP_K) * layer.group_size > 1 << 32:
        return f"{layer.in_features} inputs with group size {layer.group_size} overflow the group index"
    return None


REPACK_OUTPUTS = 4096  # outputs repacked at a time: bounds the temporaries of a large stack (a multiple of 32)
DEQUANTIZE_OUTPUTS = 4096  # outputs dequantized at a time for cuBLAS: bounds the fp16 copy (a multiple of 32)


def repack(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int):
    """Q4Linear buffers -> (weights, scales) in the kernel layout above, on the same device. Slices of outputs
    are independent in that layout, so a wide layer is repacked a few thousand outputs at a time."""
    parts = [_repack_outputs(packed[:, c:c + REPACK_OUTPUTS], scale[:, c:c + REPACK_OUTPUTS],
                             offset[:, c:c + REPACK_OUTPUTS], group_size)
             for c in range(0, packed.shape[1], REPACK_OUTPUTS)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([weights for weights, _ in parts]), torch.cat([scales for _, scales in parts])


def _repack_outputs(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int):
    in_features, out_features = packed.shape[0] * 8, packed.shape[1]
    k_pad, n_pad = _ceil_to(in_features, STEP_K), _ceil_to(out_features, SLICE_N)
    k_tiles, slices = k_pad // TILE_K, n_pad // SLICE_N

    q = F.pad(unpack_rows(packed), (0, n_pad - out_features, 0, k_pad - in_features))
    # Input k = 64 kt + 16 t + 4 j + 2 b1 + b2; output o = 32 s + 16 h + 8 r + g; nibble i = 4 b2 + 2 b1 + r.
    q = q.view(k_tiles, 4, 4, 2, 2, slices, 2, 2, 8)  # kt, t, j, b1, b2, s, h, r, g
    q = q.permute(5, 0, 6, 8, 1, 2, 4, 3, 7)  # s, kt, h, g, t, j, b2, b1, r
    q = q.reshape(slices, k_tiles, 2, 32, 4, 8).to(torch.int32)
    weights = torch.zeros(slices, k_tiles, 2, 32, 4, dtype=torch.int32, device=packed.device)
    for i in range(8):
        # Nibble 7 shifts into the sign bit; int32 shifts wrap, which is the bit pattern wanted.
        weights |= q[..., i] << (4 * i)

    groups_pad = -(-k_pad // group_size)
    pairs = torch.zeros(groups_pad, n_pad, 2, dtype=torch.float16, device=packed.device)
    pairs[: scale.shape[0], :out_features, 0] = scale
    pairs[: offset.shape[0], :out_features, 1] = offset
    # [group, s, h, r, g, (scale, offset)] -> [s, group, g, (h, r, scale/offset)]
    scales = pairs.view(groups_pad, slices, 2, 2, 8, 2).permute(1, 0, 4, 2, 3, 5).reshape(slices, groups_pad, 8, 8)
    return weights.contiguous(), scales.contiguous()


@dataclass
class PreparedQ4:
    """A Q4Linear in the kernel layout; call `matmul` with float16 activations on its device."""

    weights: torch.Tensor
    scales: torch.Tensor
    perm: torch.Tensor | None  # int32
    group_magic: int
    in_features: int
    out_features: int
    folded: bool  # each kernel step's inputs share one group, which the kernel's faster path needs
    paired: bool  # the outputs are two halves (gate and up) stored paired, see the top of the file

    def gates(self, x: torch.Tensor) -> bool:
        """Whether `matmul(x, gated=True)` takes x: the layer's halves are paired and x has at most
        MAX_KERNEL_ROWS rows."""
        return self.paired and x.shape[:-1].numel() <= MAX_KERNEL_ROWS

    def matmul(self, x: torch.Tensor, out: torch.Tensor | None = None, *, low_rank: LowRank | None = None,
               gated: bool = False, mode: int = 0, overlap: bool = True) -> torch.Tensor:
        """y = x[..., perm] @ W^T for x [..., in_features] float16; written into `out` if given.
        `low_rank` (h, b) adds h @ b^T, a LoRA update, in the kernel's epilogue; h is [..., rank] like x,
        or partial sums [parts, ..., rank]. `gated` (where `gates(x)`, without low_rank): the layer is a stack of
        SwiGLU's gate and up, and y [..., out_features / 2] is silu(gate) * up, computed in the kernel's epilogue
        instead of a kernel of its own.

        For tests and the benchmark: `mode` picks how the kernel reads x (0 chooses: shared memory
        when it fits; 1 global memory; 2 shared memory), and `overlap=False` turns off starting
        the kernel while the previous one in the stream finishes (programmatic dependent launch).
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected {self.in_features} input features, got {x.shape[-1]}")
        if gated and (low_rank is not None or not self.gates(x)):
            raise ValueError(f"a gated product takes a layer of paired halves, 1 to {MAX_KERNEL_ROWS} rows and no "
                             "LoRA update")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        width = self.out_features // 2 if gated else self.out_features
        if out is None:
            y = x2.new_empty(rows, width)
        else:
            if out.shape != (*lead, width) or not out.is_contiguous():
                raise ValueError(f"out must be contiguous with shape {(*lead, width)}")
            y = out.view(rows, width)
        if rows == 0:
            return y.view(*lead, width)
        h, b = (None, None) if low_rank is None else low_rank
        if h is not None:  # [rows, rank], or partial sums [parts, rows, rank]
            h = h.reshape(h.shape[0], rows, -1) if h.dim() > x.dim() else h.reshape(rows, -1)
        ext = extension()
        if rows <= MAX_KERNEL_ROWS:
            ext.matmul(x2, self.weights, self.scales, self.perm, self.group_magic, self.folded, self.paired,
                       self.out_features, y, h, b, gated, mode, overlap)
        else:
            if self.perm is not None:
                x2 = x2.index_select(1, self.perm)
            # Slices of outputs are independent in the layout, so a wide stack is dequantized and multiplied a
            # few thousand outputs at a time: its fp16 copy would be a large temporary (180 MB for
            # Llama-2-7B's gate and up).
            for start in range(0, self.out_features, DEQUANTIZE_OUTPUTS):
                stop = min(start + DEQUANTIZE_OUTPUTS, self.out_features)
                slices = slice(start // SLICE_N, -(-stop // SLICE_N))
                part = ext.dequantize(self.weights[slices], self.scales[slices], self.group_magic, self.in_features,
                                      stop - start, self.paired)
                if self.paired:  # the part holds its slices' outputs of the first half, then of the second
                    half, second = (stop - start) // 2, self.out_features // 2 + start // 2
                    torch.matmul(x2, part[:half].t(), out=y[:, start // 2:start // 2 + half])
                    torch.matmul(x2, part[half:].t(), out=y[:, second:second + half])
                else:
                    torch.matmul(x2, part.t(), out=y[:, start:stop])
                del part  # before the next part is dequantized: one at a time is all the planner counts
            if low_rank is not None:
                add_low_rank(y, (h, b), in_place=True)
        return y.view(*lead, width)

    __call__ = matmul


def pairs_halves(layer: Q4Linear) -> bool:
    """Whether the layer is a stack of two layers that the kernels store paired (see the top of the file)."""
    widths = layer.stacked_outputs
    return len(widths) == 2 and widths[0] == widths[1] and widths[0] % (SLICE_N // 2) == 0


def paired_order(out_features: int) -> torch.Tensor:
    """The stack's outputs in paired order: 16 of the first half, the same 16 of the second, and so on."""
    return torch.arange(out_features).view(2, -1, SLICE_N // 2).transpose(0, 1).reshape(-1)


def prepare(layer: Q4Linear) -> PreparedQ4:
    """Repack `layer` (already on its CUDA device) for the kernels; scales become float16."""
    if not layer.packed.is_cuda:
        raise ValueError("prepare needs the layer on a CUDA device")
    problem = unsupported_reason(layer)
    if problem:
        raise ValueError(f"the 4-bit CUDA kernels cannot run this layer: {problem}")
    packed, scale, offset = layer.packed, layer.scale, layer.offset
    paired = pairs_halves(layer)
    if paired:
        order = paired_order(layer.out_features).to(packed.device)
        packed, scale, offset = packed[:, order], scale[:, order], offset[:, order]
    weights, scales = repack(packed, scale.to(torch.float16), offset.to(torch.float16), layer.group_size)
    # The kernel starts loading weights before the previous kernel in its stream has finished
    # (programmatic dependent launch), so they must be complete before any launch that reads them.
    torch.cuda.synchronize(weights.device)
    return PreparedQ4(
        weights=weights,
        scales=scales,
        perm=None if layer.perm is None else layer.perm.to(torch.int32).contiguous(),
        group_magic=group_magic(layer.group_size),
        in_features=layer.in_features,
        out_features=layer.out_features,
        folded=layer.group_size % STEP_K == 0 or layer.group_size == layer.in_features,
        paired=paired,
    )
