// Launch interface shared by the kernels (q4_kernels.cu) and the PyTorch binding (q4_binding.cpp).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace q4 {

// Buffers in the layout that engine/cuda/q4.py `repack` writes. Indices into them are 32-bit.
struct MatmulArgs {
  const half* x;          // [rows, in_features], rows 1..16, 16-byte aligned
  int rows;
  int in_features;
  const int* perm;        // [in_features] or nullptr; used only when staged
  int x_stride;           // staged: shared-memory row stride in halves (k_tiles * 64 + 8)
  const uint4* weights;   // [slices, k_tiles, 2 tiles, 32 lanes] of 4 words
  const uint4* scales;    // [slices, groups_pad, 8] of (scale, offset) for outputs g, g + 8 of both tiles
  int k_tiles;
  int groups_pad;
  uint32_t group_magic;   // group of input k = umulhi(k, group_magic)
  bool folded;            // each warp step's 128 inputs share one group (q4_kernels.cu's folded path)
  half* y;                // [rows, out_features], or [rows, out_features / 2] when gated
  int out_features;
  // The outputs are two halves of equal width (gate and up) stored paired: slice s holds outputs 16 s ..
  // 16 s + 15 of the first half in its tile 0 and the same outputs of the second half in its tile 1
  // (q4.py `repack`). y keeps the halves' own order either way.
  bool paired;
  // Paired only: y gets SwiGLU's activation silu(first half) * second half, not the two halves.
  bool gated;
  // A LoRA update added in the epilogue, y += h @ b^T, when rank > 0, with h the sum of `lora_parts`
  // partial sums. The kernel copies h and b into shared memory 16 bytes at a time: the rank is a
  // multiple of 8, the strides of h multiples of 4, both 16-byte aligned.
  const float* lora_h;    // [parts, rows, rank], parts lora_part_stride and rows lora_h_stride floats apart
  int lora_h_stride;
  int lora_parts;
  int lora_part_stride;
  const half* lora_b;     // [out_features, rank]
  int lora_rank;
  int k_split;            // set by matmul: 1, or 2 blocks (a cluster) per slice (q4_kernels.cu, Share)
};

struct DequantArgs {
  const uint4* weights;
  const uint4* scales;
  int slices;
  int k_tiles;
  int groups_pad;
  uint32_t group_magic;
  int in_features;
  int out_features;
  bool paired;            // as in MatmulArgs
  half* w;                // [out_features, in_features]
};

// Whether the blocks of a product with these outputs split each slice's inputs in clusters of two on the
// current GPU (sm_90+, at most one slice per multiprocessor, no gate and no LoRA epilogue).
bool splits_inputs(int out_features, bool gated, int lora_rank);

// The most bytes of x that may be staged in shared memory for `rows` activation rows, beside a LoRA
// update of rank `rank` (0 for none) whose h comes in `parts` partial sums, for the folded path or not.
size_t max_staged_bytes(int rows, int rank, int parts, bool folded);

// staged: gather x (through perm, if any) into shared memory first; needs rows * x_stride * 2 <=
// max_staged_bytes(rows). overlap: launch as a programmatic dependent (sm_90+), so that the
// kernel starts loading weights while the previous kernel in the stream finishes; the weights
// must then have been written before that kernel was launched.
cudaError_t matmul(const MatmulArgs& args, bool staged, bool overlap, cudaStream_t stream);
cudaError_t dequantize(const DequantArgs& args, cudaStream_t stream);

}  // namespace q4
