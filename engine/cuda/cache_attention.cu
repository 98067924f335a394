// Decode attention over a 4-bit KV cache on tensor cores: the parts of split attention, which
// fused.py's merge kernel combines, for up to 8 query rows per KV head (one token's GQA group).
//
// The cache layout is engine/cache.py's: for each slot and head, byte j holds entry j in its low
// nibble and entry dim/2 + j in its high one, and each group of 32 entries has a float16 (scale,
// minimum). The Triton kernel that reads it unpacks entries one at a time and is bound by
// instructions, at a fifth of the memory bandwidth. Here the levels go into float16 by or-ing
// nibbles into the mantissa of 1024.0 (common.cuh), eight entries for five instructions, and both
// products run as m16n8k16 mma with the query rows as the 8 columns:
//  - scores = K q: A is 16 slots x 16 entries of K, B 16 entries of q for 8 rows. The order of entries
//    inside an mma step is free, as long as K and q agree. Lane (g, t) reads the words at bytes
//    32b + 8t and 32b + 8t + 4 of slots g and g + 8; each word gives entries (4m, 4m + 2) and (4m + 1,
//    4m + 3) of group b in its low nibbles and of group b + dim/64 in its high ones: A registers of two
//    mma steps, each of which covers 16 entries of one group.
//  - out = V^T p: A is 16 entries x 16 slots of V, B the probabilities of 16 slots for 8 rows, which
//    is the score accumulator's layout after four shuffles. V's A registers pair one entry of two
//    slots, so a byte permute first puts the same bytes of two slots side by side.
// Entries are dequantized to float16 before each product, as the Triton kernel does.
//
// A tile is 16 slots. Each warp of a block walks every fourth tile of the block's split with its
// own online softmax, and the block merges its warps at the end. A warp's tiles stream through a ring
// of shared-memory stages filled by cp.async, kStages tiles ahead: registers could hold one tile ahead,
// too few bytes in flight to keep the memory busy.
//
// A decode step's own token may come before RoPE (CacheAttentionArgs::new_keys): then every warp rotates q
// as it reads it, and the warp whose tile holds the token's slot quantizes and stores its key and value
// before copying that tile, so that no launch of its own sits between q/k/v and this kernel.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cache_attention.h"
#include "common.cuh"

namespace q4 {
namespace {

constexpr int kWarps = 4;
constexpr int kTile = 16;    // slots per warp step
constexpr int kMaxRows = 8;  // query rows: the mma's columns
constexpr int kStages = 4;   // tiles in flight per warp

// A ring stage: a tile's packed keys and values as they lie in the cache, rows padded by 16 bytes so
// that the lanes reading one entry of four slots hit different banks, then the tile's key and value
// scales.
template <int kDim>
struct Stage {
  static constexpr int kSlotBytes = kDim / 2, kRowBytes = kSlotBytes + 16, kScaleBytes = kDim / 8;
  static constexpr int kKeys = 0, kValues = kTile * kRowBytes, kKeyScales = 2 * kTile * kRowBytes,
                       kValueScales = kKeyScales + kTile * kScaleBytes, kBytes = kValueScales + kTile * kScaleBytes;
};

// Start copying the tile at slot `tile` of the head whose slots start at `first` into `stage`; the
// lanes share the copies. Slots past `last` copy slot `last` again: their scores are masked, and the
// reads stay inside the cache.
template <int kDim>
__device__ __forceinline__ void issue_tile(unsigned char* stage, const CacheAttentionArgs& a, size_t first, int tile,
                                           int last, int lane) {
  using S = Stage<kDim>;
  constexpr int kChunks = S::kSlotBytes / 16;  // per slot
#pragma unroll
  for (int c = lane; c < kTile * kChunks; c += 32) {
    const int row = c / kChunks, offset = c % kChunks * 16;
    const size_t slot = first + min(tile + row, last);
    copy_bypassing_l1(stage + S::kKeys + row * S::kRowBytes + offset, a.keys + slot * S::kSlotBytes + offset);
    copy_bypassing_l1(stage + S::kValues + row * S::kRowBytes + offset, a.values + slot * S::kSlotBytes + offset);
  }
  const int row = lane % kTile;
  const size_t slot = first + min(tile + row, last);
  const half* scales = lane < kTile ? a.key_scales : a.value_scales;
  copy_through_l1<S::kScaleBytes>(stage + (lane < kTile ? S::kKeyScales : S::kValueScales) + row * S::kScaleBytes,
                                  scales + slot * (kDim / 16));
}

// What one lane reads of a tile.
template <int kDim>
struct TileBytes {
  static constexpr int kBlocks = kDim / 64;  // 32-byte blocks of a slot's packed entries
  static constexpr int kGroups = kDim / 32;
  uint2 keys[2][kBlocks];            // slots g, g + 8: bytes 32b + 8t .. 32b + 8t + 7
  uint32_t key_scales[2][kGroups];   // their (scale, minimum) by group
  uint32_t values[4][kBlocks];       // slots 2t, 2t + 1, 2t + 8, 2t + 9: bytes 32b + 4g .. 32b + 4g + 3
  uint32_t value_scales[4][kGroups];
};

template <int kGroups>
__device__ __forceinline__ void read_scales(uint32_t (&out)[kGroups], const unsigned char* slot_scales) {
  if constexpr (kGroups == 4) {
    const uint4 v = *reinterpret_cast<const uint4*>(slot_scales);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else {
    static_assert(kGroups == 2, "heads of 64 or 128 entries");
    const uint2 v = *reinterpret_cast<const uint2*>(slot_scales);
    out[0] = v.x, out[1] = v.y;
  }
}

template <int kDim>
__device__ __forceinline__ void read_tile(TileBytes<kDim>& d, const unsigned char* stage, int g, int t) {
  using S = Stage<kDim>;
  constexpr int kBlocks = TileBytes<kDim>::kBlocks;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = g + 8 * r;
#pragma unroll
    for (int b = 0; b < kBlocks; ++b)
      d.keys[r][b] = *reinterpret_cast<const uint2*>(stage + S::kKeys + row * S::kRowBytes + 32 * b + 8 * t);
    read_scales(d.key_scales[r], stage + S::kKeyScales + row * S::kScaleBytes);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int row = 2 * t + (j & 1) + 8 * (j >> 1);
#pragma unroll
    for (int b = 0; b < kBlocks; ++b)
      d.values[j][b] = *reinterpret_cast<const uint32_t*>(stage + S::kValues + row * S::kRowBytes + 32 * b + 4 * g);
    read_scales(d.value_scales[j], stage + S::kValueScales + row * S::kScaleBytes);
  }
}

// Mma step i of either product, in a slot's packed bytes: 32-byte block i / 4, its half i / 2 % 2, and the
// low (i even) or high nibbles, which hold the entries of group `block` or of group block + dim/64.
// - Score step i covers entries e0 .. e0 + 3 of every lane t, e0 = 32 block + 8t + 4 half (+ dim/2 for the
//   high nibbles): the word at byte 32 block + 8t + 4 half of slots g and g + 8.
// - Output tile i holds entry 32 block + 4g + 2 half (+ dim/2) in A row g and the next entry in row g + 8.
template <int kDim>
struct Step {
  int block, half;
  bool high;
  __device__ __forceinline__ int group() const { return block + (high ? kDim / 64 : 0); }
  __device__ __forceinline__ int first_entry() const { return 32 * block + (high ? kDim / 2 : 0); }
  __device__ __forceinline__ uint32_t nibbles() const { return high ? kHighNibbles : kLowNibbles; }
};

template <int kDim>
__device__ __forceinline__ constexpr Step<kDim> step_at(int i) { return {i / 4, i / 2 % 2, i % 2 == 1}; }

// Field f of the slot pair (2t, 2t + 1) (pair 0) or (2t + 8, 2t + 9) (pair 1) in a 32-byte block: entry
// 32 block + 4g + f of both slots side by side, as the A registers of the output pair them. One byte permute
// puts byte f of the two slots' words at bytes 0 and 2, where biased_levels' masks look; bytes 1 and 3 repeat
// them and are masked off.
template <int kDim>
__device__ __forceinline__ uint32_t value_field(const TileBytes<kDim>& d, int block, int pair, int f) {
  const uint32_t selector = 0x1111u * f + 0x4400u;
  return __byte_perm(d.values[2 * pair][block], d.values[2 * pair + 1][block], selector);
}

// RoPE's rotation of the entries x and y that lie dim/2 apart, by their angle: (x cos - y sin, y cos + x sin), in
// float32 as fused.py's rope_store_kernel computes it.
__device__ __forceinline__ float2 rotated(float x, float y, float cos, float sin) {
  return make_float2(x * cos - y * sin, y * cos + x * sin);
}

// Store one head's new vector x [dim] (a key rotated by cos and sin first) at absolute slot `slot` of a 4-bit
// cache part, as fused.py's store_head does: each group of 32 entries as levels 0..15 from its minimum and its
// range over 15, both rounded to float16 and stored beside the bytes; entry j in byte j's low nibble and entry
// dim/2 + j in its high one. One warp: lane l holds entries E l .. E l + E - 1 (E = dim / 32), so that lane
// l ^ 16 holds the entries dim/2 away, which RoPE pairs and a byte packs together.
template <int kDim>
__device__ __forceinline__ void store_new_slot(const half* x, const half* cos, const half* sin, uint8_t* data,
                                               half* scales, size_t slot, int lane) {
  constexpr int kPerLane = kDim / 32, kHalf = kDim / 2, kGroupLanes = 32 / kPerLane;
  const int own = kPerLane * lane, partner = own ^ kHalf;
  float v[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    v[j] = __half2float(x[own + j]);
    if (cos != nullptr) {  // then rounded to float16, as the eager path's keys are
      const float other = __half2float(x[partner + j]);
      const float c = __half2float(cos[own % kHalf + j]), s = __half2float(sin[own % kHalf + j]);
      v[j] = __half2float(__float2half_rn(own < kHalf ? rotated(v[j], other, c, s).x : rotated(other, v[j], c, s).y));
    }
  }
  float low = v[0], high = v[0];
#pragma unroll
  for (int j = 1; j < kPerLane; ++j) low = fminf(low, v[j]), high = fmaxf(high, v[j]);
#pragma unroll
  for (int offset = 1; offset < kGroupLanes; offset *= 2) {
    low = fminf(low, __shfl_xor_sync(~0u, low, offset));
    high = fmaxf(high, __shfl_xor_sync(~0u, high, offset));
  }
  const half scale = __float2half_rn(__fdiv_rn(high - low, 15.f)), minimum = __float2half_rn(low);
  const float divisor = __half2float(scale) > 0.f ? __half2float(scale) : 1.f;
  uint32_t levels = 0;  // one per byte
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const float step = __fdiv_rn(v[j] - __half2float(minimum), divisor);
    levels |= uint32_t(fminf(fmaxf(floorf(step + 0.5f), 0.f), 15.f)) << (8 * j);
  }
  const uint32_t partner_levels = __shfl_xor_sync(~0u, levels, 16);
  if (own < kHalf) {
    const uint32_t bytes = levels | partner_levels << 4;
    uint8_t* target = data + slot * kHalf + own;
    if constexpr (kPerLane == 4) {
      *reinterpret_cast<uint32_t*>(target) = bytes;
    } else {
      *reinterpret_cast<uint16_t*>(target) = uint16_t(bytes);
    }
  }
  if (lane % kGroupLanes == 0)
    *reinterpret_cast<__half2*>(scales + (slot * (kDim / 32) + own / 32) * 2) = __halves2half2(scale, minimum);
}

// 2^x on the special-function unit, as __expf computes e^x after scaling x by log2(e).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <int kDim>
__global__ void __launch_bounds__(kWarps * 32) cache_attention_kernel(const CacheAttentionArgs a) {
  using Bytes = TileBytes<kDim>;
  constexpr int kSteps = kDim / 16;
  const float kInf = __int_as_float(0x7f800000);
  // The warps' rings, and after the walk the warps' states for the merge.
  __shared__ __align__(16) unsigned char shared[kWarps * kStages * Stage<kDim>::kBytes];
  static_assert(sizeof(float) * kWarps * kMaxRows * (kDim + 2) <= sizeof(shared), "the merge fits in the rings");
  auto& warp_out = *reinterpret_cast<float(*)[kWarps][kMaxRows][kDim]>(shared);
  auto& warp_reference = *reinterpret_cast<float(*)[kWarps][kMaxRows]>(shared + sizeof(warp_out));
  auto& warp_sum = *reinterpret_cast<float(*)[kWarps][kMaxRows]>(shared + sizeof(warp_out) + sizeof(warp_reference));

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int head = blockIdx.x, split = blockIdx.y;
  allow_next_kernel();
  // The slot count was set before the step began, and the slots below *a.length by earlier steps (a decode
  // step's own slot, *a.length, by the previous kernel): tiles wholly below it are copied before waiting for
  // that kernel, as fused.py's attention_parts_kernel explains.
  const int settled = int(*a.length);
  const int length = settled + a.length_bias;
  const int per_split = ((length + a.splits - 1) / a.splits + kTile - 1) / kTile * kTile;
  const int start = split * per_split, end = min(start + per_split, length);
  const size_t first = size_t(head) * a.max_seq;

  unsigned char* ring = shared + warp * kStages * Stage<kDim>::kBytes;
  const int stride = kWarps * kTile, tiles = max(0, (end - start - warp * kTile + stride - 1) / stride);
  const auto tile_at = [&](int i) { return start + warp * kTile + i * stride; };
  const auto issue = [&](unsigned char* stage, int i) {
    issue_tile<kDim>(stage, a, first, tile_at(i), length - 1, lane);
  };
  int issued = 0;
  for (; issued < kStages && issued < tiles && tile_at(issued) + kTile <= settled; ++issued) {
    issue(ring + issued * Stage<kDim>::kBytes, issued);
    commit_copies();
  }
  wait_for_previous_kernel();  // q, and a decode step's own key and value
  // A decode step's own slot: the warp whose tile holds it stores it first, and its lanes' later copies of that
  // tile see the stores after the warp's barrier.
  if (a.new_keys != nullptr && settled >= start && settled < end && (settled - start) / kTile % kWarps == warp) {
    store_new_slot<kDim>(a.new_keys + head * kDim, a.cos, a.sin, a.keys, a.key_scales, first + settled, lane);
    store_new_slot<kDim>(a.new_values + head * kDim, nullptr, nullptr, a.values, a.value_scales, first + settled,
                         lane);
    __syncwarp();
  }
  for (; issued < kStages; ++issued) {
    if (issued < tiles) issue(ring + issued * Stage<kDim>::kBytes, issued);
    commit_copies();  // empty groups too: wait_copies counts groups
  }

  // q as the B operand of the score steps: (e0, e0 + 2) and (e0 + 1, e0 + 3) of row g. Steps 2m and 2m + 1 take
  // the same four entries of q's two halves, which RoPE rotates together.
  uint32_t q_frag[kSteps][2] = {};
  if (g < a.rows) {
    const half* q = a.q + size_t(g / a.group) * a.q_row_stride + size_t(head * a.group + g % a.group) * kDim;
#pragma unroll
    for (int m = 0; m < kSteps / 2; ++m) {
      const Step step = step_at<kDim>(2 * m);
      const int e0 = step.first_entry() + 8 * t + 4 * step.half;
      const uint2 low = *reinterpret_cast<const uint2*>(q + e0);
      const uint2 high = *reinterpret_cast<const uint2*>(q + e0 + kDim / 2);
      __half2 entries[2][2] = {{as_half2(low.x), as_half2(low.y)}, {as_half2(high.x), as_half2(high.y)}};
      if (a.cos != nullptr) {  // then rounded to float16, as rope_store_kernel leaves q
        const uint2 cos = *reinterpret_cast<const uint2*>(a.cos + e0);
        const uint2 sin = *reinterpret_cast<const uint2*>(a.sin + e0);
#pragma unroll
        for (int w = 0; w < 2; ++w) {
          const float2 c = __half22float2(as_half2(w ? cos.y : cos.x)), s = __half22float2(as_half2(w ? sin.y : sin.x));
          const float2 x = __half22float2(entries[0][w]), y = __half22float2(entries[1][w]);
          const float2 first = rotated(x.x, y.x, c.x, s.x), second = rotated(x.y, y.y, c.y, s.y);
          entries[0][w] = __floats2half2_rn(first.x, second.x);
          entries[1][w] = __floats2half2_rn(first.y, second.y);
        }
      }
#pragma unroll
      for (int part = 0; part < 2; ++part) {
        q_frag[2 * m + part][0] = as_u32(__lows2half2(entries[part][0], entries[part][1]));
        q_frag[2 * m + part][1] = as_u32(__highs2half2(entries[part][0], entries[part][1]));
      }
    }
  }

  // Rows 2t and 2t + 1: the reference the probabilities are taken against (the same in every lane of a
  // column), this lane's share of the running sum, and the output by output tile (c0, c1 entry D; c2, c3 entry
  // D + 1). Any reference gives the same softmax. This one is the running maximum as of the last time a score
  // rose more than kHeadroom above it, so most tiles skip the maximum's shuffles and the rescale, and p stays
  // under 2^kHeadroom, which float16 holds. Scores are in base-2 units, so that each p is one exp2.
  constexpr float kHeadroom = 11.f, kLog2e = 1.44269504f, kLn2 = 0.69314718f;
  const float score_scale = a.scale * kLog2e;
  float reference[2] = {-kInf, -kInf}, run_sum[2] = {0.f, 0.f};
  float out[kSteps][4] = {};
  for (int n = 0; n < tiles; ++n) {
    const int tile = tile_at(n);
    unsigned char* stage = ring + n % kStages * Stage<kDim>::kBytes;
    wait_copies<kStages - 1>();  // this lane's copies of tile n have landed
    __syncwarp();                // and so have the other lanes'
    Bytes cur;
    read_tile(cur, stage, g, t);

    // Scores: c[i] is slot g (i < 2) or g + 8, row 2t + i % 2. Two accumulator sets halve the mma chain.
    float c[2][4] = {};
#pragma unroll
    for (int i = 0; i < kSteps; ++i) {
      const Step step = step_at<kDim>(i);
      uint32_t k[4];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const uint32_t word = step.half ? cur.keys[r][step.block].y : cur.keys[r][step.block].x;
        const __half2 pair = as_half2(cur.key_scales[r][step.group()]);
        const __half2 scale = __low2half2(pair), minimum = __high2half2(pair);
        k[r] = dequantize_levels(biased_levels(word, step.nibbles()), step.high, scale, minimum);
        k[2 + r] = dequantize_levels(biased_levels(word >> 8, step.nibbles()), step.high, scale, minimum);
      }
      mma_16816(c[i % 2], k, q_frag[i][0], q_frag[i][1]);
    }
    float s[4];
    bool rises = false;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bool inside = tile + g + (i < 2 ? 0 : 8) < end;
      s[i] = inside ? (c[0][i] + c[1][i]) * score_scale : -kInf;
      rises |= s[i] > reference[i % 2] + kHeadroom;
    }

    // A new reference: the running maximum, from the 8 lanes of each column. It is finite, since the tile's
    // first slot is inside.
    if (__any_sync(~0u, rises)) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float tile_max = fmaxf(s[j], s[2 + j]);
#pragma unroll
        for (int offset = 4; offset < 32; offset *= 2)
          tile_max = fmaxf(tile_max, __shfl_xor_sync(~0u, tile_max, offset));
        const float new_reference = fmaxf(reference[j], tile_max);
        const float correction = exp2_approx(reference[j] - new_reference);
        reference[j] = new_reference;
        run_sum[j] *= correction;
#pragma unroll
        for (int o = 0; o < kSteps; ++o) out[o][j] *= correction, out[o][2 + j] *= correction;
      }
    }
    float p[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = exp2_approx(s[i] - reference[i % 2]);
    run_sum[0] += p[0] + p[2];
    run_sum[1] += p[1] + p[3];

    // p as the B operand of the output steps: (slots 2t, 2t + 1) and (2t + 8, 2t + 9) of row g, from lanes
    // (2t, g / 2) and (2t + 1, g / 2), which hold rows g - g % 2 and g - g % 2 + 1 of those slots.
    const uint32_t p_low = as_u32(__floats2half2_rn(p[0], p[1])), p_high = as_u32(__floats2half2_rn(p[2], p[3]));
    const int from = 8 * t + g / 2;
    const uint32_t half_of_row = (g & 1) ? 0x7632 : 0x5410;
    const uint32_t p0 = __byte_perm(__shfl_sync(~0u, p_low, from), __shfl_sync(~0u, p_low, from + 4), half_of_row);
    const uint32_t p1 = __byte_perm(__shfl_sync(~0u, p_high, from), __shfl_sync(~0u, p_high, from + 4), half_of_row);

#pragma unroll
    for (int i = 0; i < kSteps; ++i) {
      const Step step = step_at<kDim>(i);
      uint32_t v[4];
#pragma unroll
      for (int pair = 0; pair < 2; ++pair) {
        // The scales and minimums of the pair's two slots, side by side like their entries.
        const __half2 first_slot = as_half2(cur.value_scales[2 * pair][step.group()]);
        const __half2 second_slot = as_half2(cur.value_scales[2 * pair + 1][step.group()]);
        const __half2 scale = __lows2half2(first_slot, second_slot), minimum = __highs2half2(first_slot, second_slot);
#pragma unroll
        for (int next_entry = 0; next_entry < 2; ++next_entry) {
          const uint32_t field = value_field(cur, step.block, pair, 2 * step.half + next_entry);
          v[2 * pair + next_entry] = dequantize_levels(biased_levels(field, step.nibbles()), step.high, scale, minimum);
        }
      }
      mma_16816(out[i], v, p0, p1);
    }
    // Every lane has read the stage: refill it. Refilling only now, not right after the reads, lets the
    // compiler keep the reads near their uses instead of the whole tile in registers (5% faster).
    __syncwarp();
    if (n + kStages < tiles) issue(stage, n + kStages);
    commit_copies();
  }

  // The block's warps into one part per row.
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int offset = 4; offset < 32; offset *= 2) run_sum[j] += __shfl_xor_sync(~0u, run_sum[j], offset);
  __syncthreads();  // every warp is done with its ring
  if (g == 0) {
#pragma unroll
    for (int j = 0; j < 2; ++j) warp_reference[warp][2 * t + j] = reference[j], warp_sum[warp][2 * t + j] = run_sum[j];
  }
#pragma unroll
  for (int i = 0; i < kSteps; ++i) {
    const Step step = step_at<kDim>(i);
    const int entry = step.first_entry() + 4 * g + 2 * step.half;
#pragma unroll
    for (int j = 0; j < 4; ++j) warp_out[warp][2 * t + j % 2][entry + j / 2] = out[i][j];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < a.rows * kDim; e += kWarps * 32) {
    const int row = e / kDim, entry = e % kDim;
    float best = -kInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) best = fmaxf(best, warp_reference[w][row]);
    float total = 0.f, norm = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float reference = warp_reference[w][row];
      const float weight = reference == -kInf ? 0.f : exp2_approx(reference - best);  // -inf: a warp without tiles
      total += weight * warp_out[w][row][entry];
      norm += weight * warp_sum[w][row];
    }
    const int part = (head * a.splits + split) * a.rows + row;
    a.part_out[size_t(part) * kDim + entry] = total;
    if (entry == 0) a.part_max[part] = best * kLn2, a.part_sum[part] = norm;  // the merge works in base e
  }
}

// The kernel for heads of `dim` entries, or nullptr.
void (*kernel_for(int dim))(CacheAttentionArgs) {
  return dim == 128 ? cache_attention_kernel<128> : dim == 64 ? cache_attention_kernel<64> : nullptr;
}

}  // namespace

cudaError_t cache_attention_parts(const CacheAttentionArgs& a, int dim, int kv_heads, bool overlap,
                                  cudaStream_t stream) {
  const auto kernel = kernel_for(dim);
  if (kernel == nullptr) return cudaErrorInvalidValue;
  return launch_dependent(kernel, dim3(kv_heads, a.splits), dim3(kWarps * 32), 0, overlap, 1, stream, a);
}

cudaError_t cache_attention_resident_blocks(int dim, int* blocks) {
  const auto kernel = kernel_for(dim);
  if (kernel == nullptr) return cudaErrorInvalidValue;
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * 32, 0);
  *blocks = sms * per_sm;
  return err;
}

}  // namespace q4
