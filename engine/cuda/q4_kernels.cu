// 4-bit matrix products on tensor cores for 1 to 16 activation rows, and a dequantizer for the
// many-row path. The weight layout is the one engine/cuda/q4.py `repack` writes; its docstring is
// the contract and the two files change together.
//
// Weights are the 16 x 16 "A" operand of m16n8k16 mma instructions and the activations the
// 16 x 8 "B" operand (8 rows per mma), so batch 1 wastes only tensor-core slots, which are
// plentiful, and batch 16 costs two mmas where CUDA cores would need sixteen FMAs per weight.
// A tile is 16 outputs x 64 inputs: one 16-byte word group per lane, four mma K steps. The input
// order inside a tile gives each lane 16 consecutive inputs of its outputs (one group) and 32
// contiguous bytes of activations.
//
// At batch 1 the H200 must retire ~32 weights per clock per multiprocessor to keep up with
// memory, so instruction count and dependency chains per weight are what limit:
//  - Each warp step handles two tiles (32 outputs) of the same inputs, sharing activation loads
//    and bookkeeping.
//  - Where 128 inputs share one group (group sizes that are multiples of 128, or one group per row)
//    and there are at most 8 activation rows, the product is "folded": a step covers 128 inputs (two
//    input tiles), the mma multiplies x by the levels as they come out of the nibbles, biased by 1024
//    (the 1024 + q that or-ing a nibble into the mantissa of 1024.0 gives), and the step ends with
//    y += scale * (c - 1024 sum(x)) + offset * sum(x) in float32, sum(x) coming from one more mma
//    with a matrix of ones. That is 6 instructions per 8 weights where scaling each weight first
//    takes 12. Smaller groups, and more rows (whose activations would not fit in registers twice),
//    take that per-weight path, one input tile per step.
//  - Weights stream through a per-warp ring of shared-memory stages filled by cp.async, several
//    steps ahead; loads into registers cannot do that, since a warp has 6 scoreboards and
//    waiting for one step's registers also waits for every load issued after it.
//  - The grid is persistent: each block walks several 32-output slices, so its ring keeps memory
//    busy across slices, and x is staged once per block.
//  - A LoRA update's factors (h for every row, b for the slice at hand) are copied into shared
//    memory while the weights stream, so the epilogue that adds h @ b^T waits for no load.
//  - SwiGLU's gate and up are stored paired, 16 outputs of each in every slice, so that the epilogue
//    can write silu(gate) * up in place of both: a decode step's activation kernel is gone.
//  - A layer with no more slices than multiprocessors (o and down: 4096 outputs) would give each
//    multiprocessor one block, and in a decode step each block streams at about the same rate (~15 GB/s,
//    bench/NOTES.md session 11) however many share a multiprocessor. Such a layer runs on clusters of two
//    blocks (sm_90+) that split each slice's inputs, and the second block hands its sums to the first
//    through distributed shared memory. Such a block needs half of x once, so it reads x from global memory
//    instead of staging it (q4_binding.cpp).

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "q4_kernels.h"

namespace q4 {
namespace {

constexpr int kWarps = 8;               // per block, two blocks per multiprocessor; warps split the inputs
constexpr int kTileK = 64;              // inputs per tile
constexpr int kTilesN = 2;              // output tiles per warp step
constexpr int kSliceN = 16 * kTilesN;   // outputs per block step
// Input tiles per warp step: two on the folded path (one group of 128), else one. q4.py pads the inputs
// to a multiple of two tiles.
__host__ __device__ constexpr int tiles_k(bool folded) { return folded ? 2 : 1; }
// Ring stages per warp: kStages - 1 steps in flight, 3 or 6 KB of weights.
constexpr int kStages = 4;
// A stage holds a lane's words of the step's tiles and one (scale, offset) load.
__host__ __device__ constexpr size_t ring_bytes(bool folded) {
  return size_t(kWarps) * kStages * 32 * (tiles_k(folded) * kTilesN + 1) * sizeof(uint4);
}
// Shared memory per block such that two fit on a multiprocessor (228 KB, 1 KB reserved each),
// less a little for the kernel's own variables.
constexpr size_t kBlockSharedBudget = 112 * 1024;

// Nibbles 0..7 of `word` hold, for this lane's output rows r0 = g and r1 = g + 8 and inputs
// k..k+3 of one mma step: n0 = (r0,k) n1 = (r1,k) n2 = (r0,k+2) n3 = (r1,k+2)
//                         n4 = (r0,k+1) n5 = (r1,k+1) n6 = (r0,k+3) n7 = (r1,k+3),
// so that or-ing nibble pairs into the mantissa of 1024.0 gives the four half2 A registers:
// rows r0 hold 1024 + q, rows r1 hold 1024 + 16 q (their nibbles sit 4 bits higher).
__device__ __forceinline__ void biased_word(uint32_t word, uint32_t a[4]) {
  const uint32_t high = word >> 8;
  a[0] = biased_levels(word, kLowNibbles);
  a[1] = biased_levels(word, kHighNibbles);
  a[2] = biased_levels(high, kLowNibbles);
  a[3] = biased_levels(high, kHighNibbles);
}

// The same A registers as weights scale * q + offset in fp16.
__device__ __forceinline__ void dequant_word(uint32_t word, __half2 scale0, __half2 offset0, __half2 scale1,
                                             __half2 offset1, uint32_t a[4]) {
  uint32_t biased[4];
  biased_word(word, biased);
  a[0] = dequantize_levels(biased[0], false, scale0, offset0);
  a[1] = dequantize_levels(biased[1], true, scale1, offset1);
  a[2] = dequantize_levels(biased[2], false, scale0, offset0);
  a[3] = dequantize_levels(biased[3], true, scale1, offset1);
}

// What a lane holds for one step: its words of the step's tiles, the (scale, offset) of its outputs g
// and g + 8 in both output tiles, and 16 activations of each 8-row slice of x for each input tile.
// Lanes past the last row read the last row again: their mma columns are never stored, so nothing
// needs zero-filling.
template <int kRowTiles, bool kFolded>
struct Step {
  static constexpr int kTilesK = tiles_k(kFolded);
  uint4 w[kTilesK][kTilesN];
  uint4 scale_offset;  // output tile 0: (s_g, o_g), (s_g+8, o_g+8); tile 1 the same
  uint4 x[kTilesK][kRowTiles][2];
};

__device__ __forceinline__ int lane_row(int r, int g, int rows) { return min(r * 8 + g, rows - 1); }

// Where output `prepared` of the layout (slice * kSliceN + o) belongs: its column of y and row of the dense
// weight. Paired outputs (q4_kernels.h) go back to their halves' order.
__device__ __forceinline__ int output_column(int prepared, int out_features, bool paired) {
  if (!paired) return prepared;
  const int slice = prepared / kSliceN, o = prepared % kSliceN;
  return o / 16 * (out_features / 2) + slice * 16 + o % 16;
}

// silu(gate) * up, each rounded to float16 first, as the unfused path's product stores them for its
// activation kernel.
__device__ __forceinline__ half silu_mul(float gate, float up) {
  const float g = __half2float(__float2half_rn(gate)), u = __half2float(__float2half_rn(up));
  return __float2half_rn(g / (1.f + __expf(-g)) * u);
}

// x for a step whose first input tile starts at k0 - 16 t (this lane's 16 inputs of each tile).
template <int kTilesK, int kRowTiles>
__device__ __forceinline__ void load_x_global(uint4 (&x)[kTilesK][kRowTiles][2], const MatmulArgs& a, uint32_t k0,
                                              int g) {
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int kk = 0; kk < kTilesK; ++kk) {
    const uint32_t k = k0 + kk * kTileK;
#pragma unroll
    for (int r = 0; r < kRowTiles; ++r) {
      const uint4* src = reinterpret_cast<const uint4*>(a.x + size_t(lane_row(r, g, a.rows)) * a.in_features + k);
      // in_features is a multiple of 8, so each 8-input half is wholly inside or wholly padding.
      x[kk][r][0] = k + 8 <= uint32_t(a.in_features) ? __ldg(src) : zero;
      x[kk][r][1] = k + 16 <= uint32_t(a.in_features) ? __ldg(src + 1) : zero;
    }
  }
}

template <int kTilesK, int kRowTiles>
__device__ __forceinline__ void load_x_shared(uint4 (&x)[kTilesK][kRowTiles][2], const half* xs, int x_stride,
                                              int rows, uint32_t k0, int g) {
#pragma unroll
  for (int kk = 0; kk < kTilesK; ++kk) {
#pragma unroll
    for (int r = 0; r < kRowTiles; ++r) {
      const uint4* src = reinterpret_cast<const uint4*>(xs + lane_row(r, g, rows) * x_stride + k0 + kk * kTileK);
      x[kk][r][0] = src[0];
      x[kk][r][1] = src[1];
    }
  }
}

// Mma step j of input tile kk covers inputs 4j .. 4j + 3 of this lane's 16 in that tile.
template <int kRowTiles, bool kFolded>
__device__ __forceinline__ void activations(const Step<kRowTiles, kFolded>& s, int kk, int r, int j, uint32_t& b0,
                                            uint32_t& b1) {
  const uint4& x = s.x[kk][r][j / 2];
  b0 = (j % 2) ? x.z : x.x;
  b1 = (j % 2) ? x.w : x.y;
}

__device__ __forceinline__ uint32_t word(const uint4& w, int j) {
  return j == 0 ? w.x : j == 1 ? w.y : j == 2 ? w.z : w.w;
}

// Accumulators: [output tile][activation row tile][set][c0..c3]. The per-weight path alternates its
// mma steps between two sets so that mma chains stay short; a folded step keeps its chains in
// temporaries and adds into one set.
template <int kRowTiles, bool kFolded>
using Accumulators = float[kTilesN][kRowTiles][kFolded ? 1 : 2][4];

// The per-weight path: each word becomes scaled fp16 weights, then one mma.
template <int kRowTiles>
__device__ __forceinline__ void per_weight_step(const Step<kRowTiles, false>& s, Accumulators<kRowTiles, false>& acc) {
#pragma unroll
  for (int tile = 0; tile < kTilesN; ++tile) {
    const __half2 so0 = as_half2(tile ? s.scale_offset.z : s.scale_offset.x);
    const __half2 so1 = as_half2(tile ? s.scale_offset.w : s.scale_offset.y);
    const __half2 scale0 = __low2half2(so0), offset0 = __high2half2(so0);
    const __half2 scale1 = __low2half2(so1), offset1 = __high2half2(so1);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t a[4];
      dequant_word(word(s.w[0][tile], j), scale0, offset0, scale1, offset1, a);
#pragma unroll
      for (int r = 0; r < kRowTiles; ++r) {
        uint32_t b0, b1;
        activations(s, 0, r, j, b0, b1);
        mma_16816(acc[tile][r][j % 2], a, b0, b1);
      }
    }
  }
}

// The folded path, for a step whose 128 inputs share one group. Rows g of a tile hold 1024 + q and
// rows g + 8 hold 1024 + 16 q (biased_word), exact in fp16, and so are their products with x, which the
// mma sums in float32; the bias is then taken out as 1024 sum(x) in float32. `odd_rows`: whether
// activation rows 2t + 1 (accumulators c1, c3) are real; at one row they are not, and skipping them
// saves half of the fold.
template <int kRowTiles>
__device__ __forceinline__ void folded_step(const Step<kRowTiles, true>& s, Accumulators<kRowTiles, true>& acc,
                                            bool odd_rows) {
  constexpr int kTilesK = Step<kRowTiles, true>::kTilesK;
  const uint32_t ones[4] = {0x3C003C00u, 0x3C003C00u, 0x3C003C00u, 0x3C003C00u};
  // x_sum[r][set][e]: with A all ones every output row gets sum(x): e = 0, 2 of activation row 2t, 1, 3
  // of row 2t + 1.
  float x_sum[kRowTiles][2][4] = {};
#pragma unroll
  for (int kk = 0; kk < kTilesK; ++kk) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int r = 0; r < kRowTiles; ++r) {
        uint32_t b0, b1;
        activations(s, kk, r, j, b0, b1);
        mma_16816(x_sum[r][j % 2], ones, b0, b1);
      }
    }
  }
#pragma unroll
  for (int tile = 0; tile < kTilesN; ++tile) {
    float c[kRowTiles][2][4] = {};
#pragma unroll
    for (int kk = 0; kk < kTilesK; ++kk) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t a[4];
        biased_word(word(s.w[kk][tile], j), a);
#pragma unroll
        for (int r = 0; r < kRowTiles; ++r) {
          uint32_t b0, b1;
          activations(s, kk, r, j, b0, b1);
          mma_16816(c[r][j % 2], a, b0, b1);
        }
      }
    }
    // (scale, offset) of output g and of output g + 8, whose levels came out 16 times larger.
    const float2 so0 = __half22float2(as_half2(tile ? s.scale_offset.z : s.scale_offset.x));
    float2 so1 = __half22float2(as_half2(tile ? s.scale_offset.w : s.scale_offset.y));
    so1.x *= 0.0625f;
#pragma unroll
    for (int r = 0; r < kRowTiles; ++r) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (e % 2 && !odd_rows) continue;
        const float2 so = e < 2 ? so0 : so1;
        const float sum = x_sum[r][0][e] + x_sum[r][1][e];
        const float biased = c[r][0][e] + c[r][1][e];
        acc[tile][r][0][e] = fmaf(so.x, fmaf(-1024.f, sum, biased), fmaf(so.y, sum, acc[tile][r][0][e]));
      }
    }
  }
}

// x (gathered through perm, if any) into shared memory, zero past in_features. Every load of a
// thread's share is issued before its first store, so the block pays about one L2 round trip.
__device__ __forceinline__ void stage_x(half* xs, const MatmulArgs& a) {
  constexpr int kThreads = kWarps * 32, kBatch = 4;
  const int chunks = a.k_tiles * kTileK / 8;  // 8 inputs (16 bytes) each; in_features % 8 == 0
  const int total = a.rows * chunks;
  for (int base = threadIdx.x; base < total; base += kThreads * kBatch) {
    uint4 v[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int c = base + b * kThreads, row = c / chunks, k = (c % chunks) * 8;
      v[b] = make_uint4(0, 0, 0, 0);
      if (c >= total || k >= a.in_features) continue;
      const half* src_row = a.x + size_t(row) * a.in_features;
      if (a.perm == nullptr) {
        v[b] = __ldg(reinterpret_cast<const uint4*>(src_row + k));
      } else {
        const int4 p0 = __ldg(reinterpret_cast<const int4*>(a.perm + k));
        const int4 p1 = __ldg(reinterpret_cast<const int4*>(a.perm + k) + 1);
        v[b] = make_uint4(as_u32(__halves2half2(src_row[p0.x], src_row[p0.y])),
                          as_u32(__halves2half2(src_row[p0.z], src_row[p0.w])),
                          as_u32(__halves2half2(src_row[p1.x], src_row[p1.y])),
                          as_u32(__halves2half2(src_row[p1.z], src_row[p1.w])));
      }
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int c = base + b * kThreads;
      if (c < total) *reinterpret_cast<uint4*>(xs + (c / chunks) * a.x_stride + (c % chunks) * 8) = v[b];
    }
  }
}

// Shared-memory bytes of the LoRA factors; rank 0 (no update) takes none.
__host__ __device__ __forceinline__ size_t low_rank_bytes(int rows, int rank, int parts) {
  return size_t(kSliceN) * rank * sizeof(half) + size_t(parts) * rows * rank * sizeof(float);
}

// Where a block keeps the LoRA factors in shared memory: b's rows for the slice at hand, then h's
// partial sums. The rank is a multiple of 8 (q4_binding.cpp checks), so every row of either is whole
// 16-byte chunks.
struct LowRankStage {
  half* b;   // [kSliceN, rank]
  float* h;  // [parts, rows, rank]
};

__device__ __forceinline__ LowRankStage low_rank_stage(unsigned char* shared, const MatmulArgs& a) {
  half* b = reinterpret_cast<half*>(shared);
  return {b, reinterpret_cast<float*>(b + kSliceN * a.lora_rank)};
}

// Start copying b's rows for `slice` into the stage; they land with the next commit group.
__device__ __forceinline__ void stage_low_rank_b(const LowRankStage& stage, const MatmulArgs& a, int slice) {
  const int chunks_per_row = a.lora_rank / 8;
  for (int c = threadIdx.x; c < kSliceN * chunks_per_row; c += kWarps * 32) {
    const int col = output_column(slice * kSliceN + c / chunks_per_row, a.out_features, a.paired);
    if (col < a.out_features)
      copy_bypassing_l1(stage.b + c * 8, a.lora_b + size_t(col) * a.lora_rank + (c % chunks_per_row) * 8);
  }
}

// Start copying h's partial sums into the stage. h was written by the previous kernel: call after
// wait_for_previous_kernel.
__device__ __forceinline__ void stage_low_rank_h(const LowRankStage& stage, const MatmulArgs& a) {
  const int chunks_per_row = a.lora_rank / 4;
  for (int c = threadIdx.x; c < a.lora_parts * a.rows * chunks_per_row; c += kWarps * 32) {
    const int part = c / (a.rows * chunks_per_row), row = c / chunks_per_row % a.rows;
    copy_bypassing_l1(stage.h + c * 4, a.lora_h + size_t(part) * a.lora_part_stride + size_t(row) * a.lora_h_stride +
                                           (c % chunks_per_row) * 4);
  }
}

// (h @ b^T)[row, o], output o's LoRA update for activation row `row`, from the staged factors: one
// thread's dot product, b read 8 halves at a time and h's partial sums added up on the way. The store
// loop calls it, so it needs no barrier of its own.
__device__ __forceinline__ float low_rank_dot(const LowRankStage& stage, const MatmulArgs& a, int o, int row) {
  const int rank = a.lora_rank;
  float sum = 0.f;
  for (int j = 0; j < rank; j += 8) {
    const uint4 b_word = *reinterpret_cast<const uint4*>(stage.b + o * rank + j);
    const uint32_t b_pairs[4] = {b_word.x, b_word.y, b_word.z, b_word.w};
    float h[8] = {};
    for (int part = 0; part < a.lora_parts; ++part) {
      const float4* h_part = reinterpret_cast<const float4*>(stage.h + (part * a.rows + row) * rank + j);
      const float4 low = h_part[0], high = h_part[1];
      h[0] += low.x, h[1] += low.y, h[2] += low.z, h[3] += low.w;
      h[4] += high.x, h[5] += high.y, h[6] += high.z, h[7] += high.w;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 b = __half22float2(as_half2(b_pairs[k]));
      sum += h[2 * k] * b.x + h[2 * k + 1] * b.y;
    }
  }
  return sum;
}

// How a block shares the work: the slices it owns (first, first + stride, ...) and which input steps of
// each it takes. With k_split = 2 the grid is clusters of two consecutive blocks that own the same slices;
// block rank r takes the steps of "input warps" kWarps r .. kWarps r + 7, so the pair streams a slice as one
// block of 16 warps would, from two multiprocessor slots.
struct Share {
  int rank;          // in the cluster; 0 without a split
  int first_slice;
  int slice_stride;
  int input_warp;    // this warp's place among the input_warps that split each slice's inputs
  int input_warps;
};

__device__ __forceinline__ Share share(const MatmulArgs& a, int warp) {
  const int rank = int(blockIdx.x) % a.k_split;
  return {rank, int(blockIdx.x) / a.k_split, int(gridDim.x) / a.k_split, warp + rank * kWarps, kWarps * a.k_split};
}

// Position in a block's run of steps: slice (32 outputs; see Share) and k_step; input warp w handles the
// step of input tiles kTilesK u .. kTilesK (u + 1) - 1 with u = w + k_step * input_warps (none past the last
// input tile), so all warps reach each slice's end together.
struct StreamPos {
  int slice;
  int k_step;
};

__device__ __forceinline__ void advance(StreamPos& p, int k_steps, int slice_stride) {
  if (++p.k_step == k_steps) {
    p.k_step = 0;
    p.slice += slice_stride;
  }
}

// A warp's ring, this lane's entries: stage s holds its words of the step's tiles at
// w[32 (kStepTiles s + i)], i = kTilesN kk + tile, and its scales at scale_offset[32 s]. Each lane reads
// back only what it copied itself, so no barrier sits between the copy and the read. The ring also keeps
// where this lane's copies start in global memory, so that each step's addresses cost a few instructions.
template <bool kFolded>
struct Ring {
  static constexpr int kTilesK = tiles_k(kFolded), kStepTiles = kTilesK * kTilesN;
  uint4* w;
  uint4* scale_offset;
  const uint4* weights;  // this lane's first word of the warp's first step in slice 0
  const uint4* scales;   // this lane's (scale, offset) entry of slice 0, group 0
  uint32_t k0;           // the input whose group scales the warp's first step (later steps: + k_step step_tiles 64)
  uint32_t step_tiles;   // input tiles of one k_step of all input warps

  // A folded step's scales are those of its first input, for all lanes: the mma sums every lane's inputs
  // of a column, so each lane's result needs the step's one group, even where the inputs of some lane lie
  // past the end of one group per row (zero activations there). The per-weight path scales each lane's
  // own 16 inputs.
  __device__ __forceinline__ Ring(uint4* shared, const MatmulArgs& a, int warp, const Share& share, int lane)
      : w(shared + warp * kStages * 32 * kStepTiles + lane),
        scale_offset(shared + kWarps * kStages * 32 * kStepTiles + warp * kStages * 32 + lane),
        weights(a.weights + share.input_warp * 32 * kStepTiles + lane),
        scales(a.scales + lane / 4),
        k0(uint32_t(share.input_warp) * kTilesK * kTileK + (kFolded ? 0 : lane % 4 * 16)),
        step_tiles(uint32_t(share.input_warps) * kTilesK) {}

  // Start copying this lane's share of step (slice, k_step) into stage `stage`.
  __device__ __forceinline__ void issue(int stage, const MatmulArgs& a, int slice, int k_step) const {
    const uint4* src = weights + (uint32_t(slice) * a.k_tiles + uint32_t(k_step) * step_tiles) * 32 * kTilesN;
#pragma unroll
    for (int i = 0; i < kStepTiles; ++i) copy_bypassing_l1(w + 32 * (kStepTiles * stage + i), src + 32 * i);
    const uint32_t group = __umulhi(k0 + uint32_t(k_step) * step_tiles * kTileK, a.group_magic);
    copy_through_l1(scale_offset + 32 * stage, scales + (uint32_t(slice) * a.groups_pad + group) * 8);
  }

  template <int kRowTiles>
  __device__ __forceinline__ void read(int stage, Step<kRowTiles, kFolded>& s) const {
#pragma unroll
    for (int i = 0; i < kStepTiles; ++i) s.w[i / kTilesN][i % kTilesN] = w[32 * (kStepTiles * stage + i)];
    s.scale_offset = scale_offset[32 * stage];
  }
};

// The block's 8-warp sum for output o of the slice at hand and activation row `row`.
template <int kRows>
__device__ __forceinline__ float warps_sum(const float (&partial)[kWarps][kSliceN][kRows], int o, int row) {
  float sum = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) sum += partial[w][o][row];
  return sum;
}

// Blocks per multiprocessor that the register allocation must leave room for. The grid holds as many
// blocks as fit at once, and more blocks keep more loads in flight. On the per-weight path with one row
// tile and x staged, three fit where x is small enough for three blocks' shared memory: the plain product
// stays within the 80 registers that allows by itself, the LoRA variant is held to them (bench/NOTES.md).
// The folded path's ring takes the shared memory of a third block.
constexpr int min_blocks_per_sm(int row_tiles, bool staged, bool folded) {
  return !folded && row_tiles == 1 && staged ? 3 : 2;
}

// kStaged: x (gathered through perm, if any) lives in shared memory after the rings; otherwise
// lanes read it from global memory (L2), one step ahead. kLowRank: add the LoRA update; a kernel of
// its own, so that the plain product keeps its registers and its speed. kFolded: each step's inputs
// share one group (see the top of the file).
template <int kRowTiles, bool kStaged, bool kLowRank, bool kFolded>
__global__ void __launch_bounds__(kWarps * 32, min_blocks_per_sm(kRowTiles, kStaged, kFolded))
    matmul_kernel(const MatmulArgs a) {
  static_assert(!kFolded || kRowTiles == 1, "the folded path takes at most 8 activation rows");
  using Ring = q4::Ring<kFolded>;
  constexpr int kTilesK = Ring::kTilesK;
  extern __shared__ uint4 dynamic_shared[];
  __shared__ float partial[kWarps][kSliceN][kRowTiles * 8];
  __shared__ float peer_sums[kSliceN * kRowTiles * 8];  // k_split: the second block's sums, in the first's

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const Share sh = share(a, warp);
  const int slices = (a.out_features + kSliceN - 1) / kSliceN;
  const int k_units = a.k_tiles / kTilesK;
  const int k_steps = (k_units + sh.input_warps - 1) / sh.input_warps;
  const int steps = ((slices - 1 - sh.first_slice) / sh.slice_stride + 1) * k_steps;
  const Ring ring(dynamic_shared, a, warp, sh, lane);
  // Dynamic shared memory: the rings, the LoRA factors (if any), then x (if staged).
  unsigned char* after_rings = reinterpret_cast<unsigned char*>(dynamic_shared) + ring_bytes(kFolded);
  const LowRankStage low_rank = low_rank_stage(after_rings, a);
  half* xs = reinterpret_cast<half*>(after_rings + (kLowRank ? low_rank_bytes(a.rows, a.lora_rank, a.lora_parts) : 0));

  // The weights and b never depend on the previous kernel, so their first copies go out before waiting.
  if (kLowRank) stage_low_rank_b(low_rank, a, sh.first_slice);
  StreamPos next{sh.first_slice, 0};
  for (int s = 0; s < kStages - 1; ++s) {
    const int unit = sh.input_warp + next.k_step * sh.input_warps;
    if (s < steps && unit < k_units) ring.issue(s, a, next.slice, next.k_step);
    commit_copies();  // empty groups too: wait_copies counts groups
    advance(next, k_steps, sh.slice_stride);
  }
  wait_for_previous_kernel();
  if (kLowRank) stage_low_rank_h(low_rank, a);
  if (kStaged) {
    stage_x(xs, a);
    __syncthreads();
  }

  Step<kRowTiles, kFolded> s;
  uint4 x_ahead[kTilesK][kRowTiles][2];
  if (!kStaged && sh.input_warp < k_units)
    load_x_global(x_ahead, a, uint32_t(sh.input_warp) * kTilesK * kTileK + t * 16, g);
  const bool odd_rows = a.rows > 1;
  StreamPos cur{sh.first_slice, 0};
  int stage = 0;
  Accumulators<kRowTiles, kFolded> acc = {};
  // Once every block has issued its last copy, the next kernel may start its own prologue; letting
  // it start earlier measured slower, its blocks waiting beside ours for the whole kernel.
  const int last_issue = max(0, steps - (kStages - 1));
  for (int i = 0; i < steps; ++i) {
    if (i == last_issue) allow_next_kernel();
    wait_copies<kStages - 2>();  // this lane's copies for step i have landed
    const int unit = sh.input_warp + cur.k_step * sh.input_warps;
    ring.read(stage, s);
    // Refill the stage read one step ago, kStages - 1 steps ahead.
    const int next_unit = sh.input_warp + next.k_step * sh.input_warps;
    if (i + kStages - 1 < steps && next_unit < k_units)
      ring.issue(stage == 0 ? kStages - 1 : stage - 1, a, next.slice, next.k_step);
    commit_copies();
    advance(next, k_steps, sh.slice_stride);
    stage = stage == kStages - 1 ? 0 : stage + 1;

    if (kStaged) {
      if (unit < k_units) load_x_shared(s.x, xs, a.x_stride, a.rows, uint32_t(unit) * kTilesK * kTileK + t * 16, g);
    } else {
      // x of the next step: the next input tiles, or this warp's first ones for the next slice.
#pragma unroll
      for (int kk = 0; kk < kTilesK; ++kk)
#pragma unroll
        for (int r = 0; r < kRowTiles; ++r) s.x[kk][r][0] = x_ahead[kk][r][0], s.x[kk][r][1] = x_ahead[kk][r][1];
      const int ahead_unit = cur.k_step + 1 < k_steps ? unit + sh.input_warps : sh.input_warp;
      if (i + 1 < steps && ahead_unit < k_units)
        load_x_global(x_ahead, a, uint32_t(ahead_unit) * kTilesK * kTileK + t * 16, g);
    }
    if (unit < k_units) {
      if constexpr (kFolded) {
        folded_step(s, acc, odd_rows);
      } else {
        per_weight_step(s, acc);
      }
    }
    if (cur.k_step + 1 < k_steps) {
      ++cur.k_step;
      continue;
    }
    // The last step of a slice, reached by every warp at the same i: reduce and store. The LoRA
    // factors' copies went out at least k_steps commit groups ago, one group later than this slice's
    // first weights, which the waits above have seen land once k_steps >= kStages. Accumulator
    // c0..c3 of each mma: (output g, row 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1).
#pragma unroll
    for (int tile = 0; tile < kTilesN; ++tile) {
#pragma unroll
      for (int r = 0; r < kRowTiles; ++r) {
        float sums[4] = {};
#pragma unroll
        for (auto& set : acc[tile][r]) {
#pragma unroll
          for (int e = 0; e < 4; ++e) sums[e] += set[e], set[e] = 0.f;
        }
        const int o = tile * 16 + g, row = r * 8 + 2 * t;
        partial[warp][o][row] = sums[0];
        partial[warp][o][row + 1] = sums[1];
        partial[warp][o + 8][row] = sums[2];
        partial[warp][o + 8][row + 1] = sums[3];
      }
    }
    if (kLowRank && k_steps < kStages) wait_copies<0>();
    __syncthreads();
    if (a.gated) {
      // One (gate, up) pair per thread: output o of the slice's tile 0 and of its tile 1.
      static_assert(16 * 16 <= kWarps * 32, "a slice's pairs for 16 rows: one per thread");
      const int o = threadIdx.x % 16, row = threadIdx.x / 16, width = a.out_features / 2;
      if (row < a.rows) {
        const float gate = warps_sum(partial, o, row), up = warps_sum(partial, o + 16, row);
        a.y[size_t(row) * width + cur.slice * 16 + o] = silu_mul(gate, up);
      }
    } else {
      if (sh.rank == 1) {
        // The cluster's second block: its sums go into the first block's shared memory.
        float* first_block_sums = cluster_shared(peer_sums, 0);
        for (int e = threadIdx.x; e < kSliceN * a.rows; e += kWarps * 32)
          first_block_sums[e] = warps_sum(partial, e % kSliceN, e / kSliceN);
      }
      if (a.k_split > 1) {  // the second block's sums have landed; only they need a release
        cluster_arrive(sh.rank == 1);
        cluster_wait();
      }
      if (sh.rank == 0) {
        for (int e = threadIdx.x; e < kSliceN * a.rows; e += kWarps * 32) {
          const int o = e % kSliceN, row = e / kSliceN;
          float sum = warps_sum(partial, o, row) + (a.k_split > 1 ? peer_sums[e] : 0.f);
          if (kLowRank) sum += low_rank_dot(low_rank, a, o, row);
          const int col = output_column(cur.slice * kSliceN + o, a.out_features, a.paired);
          if (col < a.out_features) a.y[size_t(row) * a.out_features + col] = __float2half_rn(sum);
        }
      }
    }
    // partial, peer_sums and the staged b are read before the next slice overwrites them. After the block's
    // last slice nothing is written, and no block reads another's shared memory past the hand-over above, so
    // both blocks of a cluster may exit at once.
    if (i + 1 == steps) break;
    if (a.k_split > 1) {
      cluster_sync();
    } else {
      __syncthreads();
    }
    cur.k_step = 0;
    cur.slice += sh.slice_stride;
    if (kLowRank && i + 1 < steps) stage_low_rank_b(low_rank, a, cur.slice);
  }
}

// One lane of one tile per thread: decode 32 weights and write them to the dense [out, in] matrix.
__global__ void dequantize_kernel(const DequantArgs a) {
  const uint32_t lanes = uint32_t(a.slices) * a.k_tiles * kTilesN * 32;
  const uint32_t id = blockIdx.x * blockDim.x + threadIdx.x;  // = ((slice k_tiles + kt) 2 + tile) 32 + lane
  if (id >= lanes) return;
  const int lane = id % 32, tile = (id / 32) % kTilesN, g = lane / 4, t = lane % 4;
  const uint32_t slice_kt = id / (32 * kTilesN);
  const int slice = slice_kt / a.k_tiles, kt = slice_kt % a.k_tiles;
  const uint32_t k0 = uint32_t(kt) * kTileK + t * 16;

  const uint4 w = __ldg(a.weights + id);
  const uint4 so = __ldg(a.scales + (uint32_t(slice) * a.groups_pad + __umulhi(k0, a.group_magic)) * 8 + g);
  const __half2 so0 = as_half2(tile ? so.z : so.x), so1 = as_half2(tile ? so.w : so.y);
  // rows[0] collects output g, rows[1] output g + 8: inputs k0 .. k0 + 15 as 8 half2 each.
  uint32_t rows[2][8];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t frag[4];
    dequant_word(word(w, j), __low2half2(so0), __high2half2(so0), __low2half2(so1), __high2half2(so1), frag);
    // frag[0] = (g, k, k+1), frag[2] = (g, k+2, k+3); frag[1], frag[3] likewise for g + 8.
    rows[0][2 * j] = frag[0];
    rows[0][2 * j + 1] = frag[2];
    rows[1][2 * j] = frag[1];
    rows[1][2 * j + 1] = frag[3];
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int out = output_column(slice * kSliceN + tile * 16 + g + 8 * h, a.out_features, a.paired);
    if (out >= a.out_features) continue;
    uint4* dst = reinterpret_cast<uint4*>(a.w + size_t(out) * a.in_features + k0);
    if (k0 + 8 <= uint32_t(a.in_features)) dst[0] = make_uint4(rows[h][0], rows[h][1], rows[h][2], rows[h][3]);
    if (k0 + 16 <= uint32_t(a.in_features)) dst[1] = make_uint4(rows[h][4], rows[h][5], rows[h][6], rows[h][7]);
  }
}

}  // namespace

// On sm_90+, a layer with no more slices than multiprocessors runs on clusters of two blocks that split each
// slice's inputs (Share), where nothing else needs the epilogue: no gate, no LoRA.
bool splits_inputs(int out_features, bool gated, int lora_rank) {
  int device = 0, sms = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
    return false;
  return major >= 9 && !gated && lora_rank == 0 && (out_features + kSliceN - 1) / kSliceN <= sms;
}

namespace {

template <int kRowTiles, bool kStaged, bool kLowRank, bool kFolded>
cudaError_t launch(const MatmulArgs& a, size_t shared_bytes, bool overlap, cudaStream_t stream) {
  auto kernel = matmul_kernel<kRowTiles, kStaged, kLowRank, kFolded>;
  // Static plus dynamic shared memory above 48 KB needs an opt-in; the call is cheap, so it is
  // made on every launch rather than cached per device.
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes));
  int device = 0, sms = 0, per_sm = 0;
  if (err == cudaSuccess) err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * 32, shared_bytes);
  if (err != cudaSuccess) return err;
  // As many blocks as fit at once, spread so that every block gets the same number of slices
  // (give or take one).
  const int slices = (a.out_features + kSliceN - 1) / kSliceN;
  MatmulArgs args = a;
  args.k_split = splits_inputs(a.out_features, a.gated, a.lora_rank) ? 2 : 1;
  const int slots = std::max(1, sms * per_sm);
  const int rounds = (slices * args.k_split + slots - 1) / slots;
  const int grid = (slices + rounds - 1) / rounds * args.k_split;
  return launch_dependent(kernel, dim3(grid), dim3(kWarps * 32), shared_bytes, overlap, args.k_split, stream, args);
}

// Whether a product takes the folded path: its groups allow it and it has at most 8 rows.
bool folded(bool groups_allow, int rows) { return groups_allow && rows <= 8; }

// The kernel's static arrays for a slice's sums: partial, and peer_sums for a cluster's second block.
size_t partial_bytes(int rows) { return size_t(kWarps + 1) * kSliceN * (rows > 8 ? 16 : 8) * sizeof(float); }

}  // namespace

size_t max_staged_bytes(int rows, int rank, int parts, bool folded) {
  return kBlockSharedBudget - ring_bytes(q4::folded(folded, rows)) - partial_bytes(rows) -
         low_rank_bytes(rows, rank, parts);
}

cudaError_t matmul(const MatmulArgs& a, bool staged, bool overlap, cudaStream_t stream) {
  const size_t bytes = ring_bytes(folded(a.folded, a.rows)) + low_rank_bytes(a.rows, a.lora_rank, a.lora_parts) +
                       (staged ? size_t(a.rows) * a.x_stride * sizeof(half) : 0);
  using Launch = cudaError_t (*)(const MatmulArgs&, size_t, bool, cudaStream_t);
  // [row tiles - 1][staged][low rank][folded]
  constexpr Launch kLaunches[2][2][2][2] = {
      {{{launch<1, false, false, false>, launch<1, false, false, true>},
        {launch<1, false, true, false>, launch<1, false, true, true>}},
       {{launch<1, true, false, false>, launch<1, true, false, true>},
        {launch<1, true, true, false>, launch<1, true, true, true>}}},
      {{{launch<2, false, false, false>, launch<2, false, false, false>},
        {launch<2, false, true, false>, launch<2, false, true, false>}},
       {{launch<2, true, false, false>, launch<2, true, false, false>},
        {launch<2, true, true, false>, launch<2, true, true, false>}}}};
  return kLaunches[a.rows > 8][staged][a.lora_rank > 0][folded(a.folded, a.rows)](a, bytes, overlap, stream);
}

cudaError_t dequantize(const DequantArgs& a, cudaStream_t stream) {
  const uint32_t lanes = uint32_t(a.slices) * a.k_tiles * kTilesN * 32;
  const int block = 256;
  dequantize_kernel<<<(lanes + block - 1) / block, block, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace q4
