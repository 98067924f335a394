// Launch interface shared by the kernels (q4_kernels.cu) and the PyTorch binding (q4_binding.cpp).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace q4 {

// Buffers in the layout that engine/cuda/q4.py `repack` writes.
struct MatmulArgs {
  const half* x;          // [rows, in_features], rows 1..16, 16-byte aligned
  int rows;
  int in_features;
  const int* perm;        // [in_features] or nullptr; used only when staged
  int x_stride;           // staged: shared-memory row stride in halves (k_tiles * 64 + 8)
  const uint4* weights;   // [n_tiles, k_tiles, 32 lanes] of 4 words
  const uint2* scales;    // [n_tiles, groups_pad, 8] of (scale, offset) for outputs g and g + 8
  int k_tiles;
  int groups_pad;
  uint32_t group_magic;   // group of input k = umulhi(k, group_magic)
  half* y;                // [rows, out_features]
  int out_features;
};

struct DequantArgs {
  const uint4* weights;
  const uint2* scales;
  int n_tiles;
  int k_tiles;
  int groups_pad;
  uint32_t group_magic;
  int in_features;
  int out_features;
  half* w;                // [out_features, in_features]
};

// warps: 4 or 8 per block; staged: gather x (through perm, if any) into shared memory first.
cudaError_t matmul(const MatmulArgs& args, int n_tiles, int warps, bool staged, cudaStream_t stream);
cudaError_t dequantize(const DequantArgs& args, cudaStream_t stream);

}  // namespace q4
