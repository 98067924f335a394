// 4-bit matrix products on tensor cores for 1 to 16 activation rows, and a dequantizer for the
// many-row path. The weight layout is the one engine/cuda/q4.py `repack` writes; its docstring is
// the contract and the two files change together.
//
// One block computes 16 outputs for every activation row. Each warp streams a share of the input
// dimension in tiles of 16 outputs x 64 inputs: one 16-byte load per lane, 512 contiguous bytes per
// warp. A lane's four 32-bit words are the A fragments of four m16n8k16 mma instructions in which
// the weights are the 16 x 16 "A" matrix and the activations the 16 x 8 "B" matrix (8 rows per
// mma), so batch 1 wastes only mma issue slots, which are plentiful, and batch 16 costs two mmas
// per word instead of sixteen FMAs per weight. The input order inside a tile is chosen so that a
// lane's 16 weights of one output row are 16 consecutive inputs: they share one group, and the
// lane's activations are 32 contiguous bytes.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "q4_kernels.h"

namespace q4 {
namespace {

constexpr int kTileN = 16;  // outputs per block (the mma M dimension)
constexpr int kTileK = 64;  // inputs per tile (four mma K steps of 16)

__device__ __forceinline__ __half2 as_half2(uint32_t bits) {
  __half2 h;
  memcpy(&h, &bits, sizeof(h));
  return h;
}

__device__ __forceinline__ uint32_t as_u32(__half2 h) {
  uint32_t bits;
  memcpy(&bits, &h, sizeof(bits));
  return bits;
}

// Weights are read exactly once: keep them out of L1 so x and the scales stay there.
__device__ __forceinline__ uint4 load_once(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// (a & b) | c in one instruction; written out because the compiler splits it in two when b and
// c are both constants (an instruction takes one immediate).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Nibbles 0..7 of `word` hold, for this lane's output rows r0 = g and r1 = g + 8 and inputs
// k..k+3 of one mma step: n0 = (r0,k) n1 = (r1,k) n2 = (r0,k+2) n3 = (r1,k+2)
//                         n4 = (r0,k+1) n5 = (r1,k+1) n6 = (r0,k+3) n7 = (r1,k+3),
// so that or-ing each nibble pair into the mantissa of 1024.0 yields the four half2 A registers
// directly; the weight is then scale * q + offset with q exact in fp16.
__device__ __forceinline__ void dequant_word(uint32_t word, __half2 scale0, __half2 offset0,
                                             __half2 scale1, __half2 offset1, uint32_t a[4]) {
  const __half2 k1024 = as_half2(0x64006400u);        // 1024.0: the exponent of q | 0x6400
  const __half2 kSixteenth = as_half2(0x2C002C00u);   // 1/16: undoes a nibble 4 bits up
  const __half2 kMinus64 = as_half2(0xD400D400u);     // -64 = -1024 / 16
  const uint32_t low_mask = 0x000F000Fu, high_mask = 0x00F000F0u, magic = 0x64006400u;
  const uint32_t high = word >> 8;
  const __half2 q0 = __hsub2(as_half2(and_or(word, low_mask, magic)), k1024);
  const __half2 q1 = __hfma2(as_half2(and_or(word, high_mask, magic)), kSixteenth, kMinus64);
  const __half2 q2 = __hsub2(as_half2(and_or(high, low_mask, magic)), k1024);
  const __half2 q3 = __hfma2(as_half2(and_or(high, high_mask, magic)), kSixteenth, kMinus64);
  a[0] = as_u32(__hfma2(q0, scale0, offset0));
  a[1] = as_u32(__hfma2(q1, scale1, offset1));
  a[2] = as_u32(__hfma2(q2, scale0, offset0));
  a[3] = as_u32(__hfma2(q3, scale1, offset1));
}

__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// What one lane holds for one tile: its weight words, the scale and offset of its two output
// rows for the tile's group, and 16 activations of each 8-row slice of x. Lanes past the last
// row read the last row again: their mma columns are never stored, so no zero-filling is needed.
template <int kRowTiles>
struct Tile {
  uint4 w;
  uint2 scale_offset;
  uint4 x[kRowTiles][2];
};

__device__ __forceinline__ int lane_row(int r, int g, int rows) { return min(r * 8 + g, rows - 1); }

template <int kRowTiles>
__device__ __forceinline__ void load_x_global(Tile<kRowTiles>& tile, const MatmulArgs& a, uint32_t k0, int g) {
#pragma unroll
  for (int r = 0; r < kRowTiles; ++r) {
    const uint4* src =
        reinterpret_cast<const uint4*>(a.x + size_t(lane_row(r, g, a.rows)) * a.in_features + k0);
    // in_features is a multiple of 8, so each 8-input half is wholly inside or wholly padding.
    const uint4 zero = make_uint4(0, 0, 0, 0);
    tile.x[r][0] = k0 + 8 <= uint32_t(a.in_features) ? __ldg(src) : zero;
    tile.x[r][1] = k0 + 16 <= uint32_t(a.in_features) ? __ldg(src + 1) : zero;
  }
}

template <int kRowTiles>
__device__ __forceinline__ void load_x_shared(Tile<kRowTiles>& tile, const half* xs, int x_stride, int rows,
                                              uint32_t k0, int g) {
#pragma unroll
  for (int r = 0; r < kRowTiles; ++r) {
    const uint4* src = reinterpret_cast<const uint4*>(xs + lane_row(r, g, rows) * x_stride + k0);
    tile.x[r][0] = src[0];
    tile.x[r][1] = src[1];
  }
}

template <int kRowTiles, bool kStaged>
__device__ __forceinline__ void fetch(Tile<kRowTiles>& tile, const MatmulArgs& a, const uint4* w_lane,
                                      const uint2* so_lane, int kt, int g, int t) {
  const uint32_t k0 = uint32_t(kt) * kTileK + t * 16;
  tile.w = load_once(w_lane + size_t(kt) * 32);
  tile.scale_offset = __ldg(so_lane + __umulhi(k0, a.group_magic) * 8);
  if (!kStaged) load_x_global(tile, a, k0, g);
}

template <int kRowTiles>
__device__ __forceinline__ void mma_tile(const Tile<kRowTiles>& tile, float (&acc)[kRowTiles][4]) {
  const __half2 so0 = as_half2(tile.scale_offset.x);
  const __half2 so1 = as_half2(tile.scale_offset.y);
  const __half2 scale0 = __low2half2(so0), offset0 = __high2half2(so0);
  const __half2 scale1 = __low2half2(so1), offset1 = __high2half2(so1);
  const uint32_t words[4] = {tile.w.x, tile.w.y, tile.w.z, tile.w.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t a[4];
    dequant_word(words[j], scale0, offset0, scale1, offset1, a);
#pragma unroll
    for (int r = 0; r < kRowTiles; ++r) {
      // Step j covers inputs k0 + 4j .. k0 + 4j + 3 of this lane: activations 4j..4j+3 of 16.
      const uint4& x = tile.x[r][j / 2];
      const uint32_t b0 = (j % 2) ? x.z : x.x;
      const uint32_t b1 = (j % 2) ? x.w : x.y;
      mma_16816(acc[r], a, b0, b1);
    }
  }
}

// x (gathered through perm, if any) into shared memory, zero past in_features. Every load of a
// thread's share is issued before its first store, so the block pays about one L2 round trip.
template <int kThreads>
__device__ __forceinline__ void stage_x(half* xs, const MatmulArgs& a) {
  const int k_pad = a.k_tiles * kTileK;
  const int chunks = k_pad / 8;  // 8 inputs (16 bytes) per chunk; in_features is a multiple of 8
  constexpr int kBatch = 4;
  for (int base = threadIdx.x; base < a.rows * chunks; base += kThreads * kBatch) {
    uint4 v[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int c = base + b * kThreads, row = c / chunks, k = (c % chunks) * 8;
      v[b] = make_uint4(0, 0, 0, 0);
      if (c >= a.rows * chunks || k >= a.in_features) continue;
      const half* src_row = a.x + size_t(row) * a.in_features;
      if (a.perm == nullptr) {
        v[b] = __ldg(reinterpret_cast<const uint4*>(src_row + k));
      } else {
        const int4 p0 = __ldg(reinterpret_cast<const int4*>(a.perm + k));
        const int4 p1 = __ldg(reinterpret_cast<const int4*>(a.perm + k) + 1);
        const __half2 h0 = __halves2half2(src_row[p0.x], src_row[p0.y]);
        const __half2 h1 = __halves2half2(src_row[p0.z], src_row[p0.w]);
        const __half2 h2 = __halves2half2(src_row[p1.x], src_row[p1.y]);
        const __half2 h3 = __halves2half2(src_row[p1.z], src_row[p1.w]);
        v[b] = make_uint4(as_u32(h0), as_u32(h1), as_u32(h2), as_u32(h3));
      }
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int c = base + b * kThreads;
      if (c < a.rows * chunks)
        *reinterpret_cast<uint4*>(xs + (c / chunks) * a.x_stride + (c % chunks) * 8) = v[b];
    }
  }
}

// kStaged: the block first gathers x through perm (or copies it) into shared memory; otherwise
// lanes read x from global memory, prefetched along with the weights.
template <int kWarps, int kRowTiles, bool kStaged>
__global__ void __launch_bounds__(kWarps * 32, 16 / kWarps) matmul_kernel(const MatmulArgs a) {
  // Tiles in flight per warp: enough bytes outstanding to cover memory latency, within the
  // register budget of 16 warps per multiprocessor (staged tiles carry no activations).
  constexpr int kPrefetch = kStaged ? 8 : 4;
  extern __shared__ uint4 staged_x[];
  __shared__ float partial[kWarps][kTileN][kRowTiles * 8];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int n_tile = blockIdx.x;
  const uint4* w_lane = a.weights + size_t(n_tile) * a.k_tiles * 32 + lane;
  const uint2* so_lane = a.scales + size_t(n_tile) * a.groups_pad * 8 + g;
  // Warp w takes tiles w, w + kWarps, ...: together the block reads contiguous runs.
  const int my_tiles = warp < a.k_tiles ? (a.k_tiles - 1 - warp) / kWarps + 1 : 0;

  Tile<kRowTiles> buf[kPrefetch];
#pragma unroll
  for (int u = 0; u < kPrefetch; ++u)
    if (u < my_tiles) fetch<kRowTiles, kStaged>(buf[u], a, w_lane, so_lane, warp + u * kWarps, g, t);

  half* xs = reinterpret_cast<half*>(staged_x);
  if (kStaged) {
    // The weight loads above are already in flight while the block stages x.
    stage_x<kWarps * 32>(xs, a);
    __syncthreads();
  }

  float acc[kRowTiles][4] = {};
  for (int i0 = 0; i0 < my_tiles; i0 += kPrefetch) {
#pragma unroll
    for (int u = 0; u < kPrefetch; ++u) {
      const int i = i0 + u;
      if (i < my_tiles) {
        const int kt = warp + i * kWarps;
        if (kStaged) load_x_shared(buf[u], xs, a.x_stride, a.rows, uint32_t(kt) * kTileK + t * 16, g);
        mma_tile(buf[u], acc);
        if (i + kPrefetch < my_tiles)
          fetch<kRowTiles, kStaged>(buf[u], a, w_lane, so_lane, kt + kPrefetch * kWarps, g, t);
      }
    }
  }

  // Accumulator c0..c3 of each mma: (output g, row 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
#pragma unroll
  for (int r = 0; r < kRowTiles; ++r) {
    partial[warp][g][r * 8 + 2 * t] = acc[r][0];
    partial[warp][g][r * 8 + 2 * t + 1] = acc[r][1];
    partial[warp][g + 8][r * 8 + 2 * t] = acc[r][2];
    partial[warp][g + 8][r * 8 + 2 * t + 1] = acc[r][3];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTileN * a.rows; i += kWarps * 32) {
    const int o = i % kTileN, row = i / kTileN;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w][o][row];
    const int col = n_tile * kTileN + o;
    if (col < a.out_features) a.y[size_t(row) * a.out_features + col] = __float2half_rn(sum);
  }
}

// One lane of one tile per thread: decode 32 weights and write them to the dense [out, in] matrix.
__global__ void dequantize_kernel(const DequantArgs a) {
  const size_t lane_id = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t tile = lane_id / 32;
  if (tile >= size_t(a.n_tiles) * a.k_tiles) return;
  const int lane = int(lane_id % 32), g = lane / 4, t = lane % 4;
  const int n_tile = int(tile / a.k_tiles), kt = int(tile % a.k_tiles);
  const uint32_t k0 = uint32_t(kt) * kTileK + t * 16;

  const uint4 w = load_once(a.weights + lane_id);
  const uint2 so = __ldg(a.scales + (size_t(n_tile) * a.groups_pad + __umulhi(k0, a.group_magic)) * 8 + g);
  const __half2 so0 = as_half2(so.x), so1 = as_half2(so.y);
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  // rows[0] collects output g, rows[1] output g + 8: inputs k0 .. k0 + 15 as 8 half2 each.
  uint32_t rows[2][8];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t frag[4];
    dequant_word(words[j], __low2half2(so0), __high2half2(so0), __low2half2(so1), __high2half2(so1), frag);
    // frag[0] = (g, k, k+1), frag[2] = (g, k+2, k+3); frag[1], frag[3] likewise for g + 8.
    rows[0][2 * j] = frag[0];
    rows[0][2 * j + 1] = frag[2];
    rows[1][2 * j] = frag[1];
    rows[1][2 * j + 1] = frag[3];
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int out = n_tile * kTileN + g + 8 * h;
    if (out >= a.out_features) continue;
    uint4* dst = reinterpret_cast<uint4*>(a.w + size_t(out) * a.in_features + k0);
    if (k0 + 8 <= uint32_t(a.in_features))
      dst[0] = make_uint4(rows[h][0], rows[h][1], rows[h][2], rows[h][3]);
    if (k0 + 16 <= uint32_t(a.in_features))
      dst[1] = make_uint4(rows[h][4], rows[h][5], rows[h][6], rows[h][7]);
  }
}

template <int kWarps, int kRowTiles, bool kStaged>
cudaError_t launch(const MatmulArgs& a, int n_tiles, size_t shared_bytes, cudaStream_t stream) {
  auto kernel = matmul_kernel<kWarps, kRowTiles, kStaged>;
  if (shared_bytes > 48 * 1024) {
    // Above 48 KB a kernel must opt in to dynamic shared memory; the call is cheap, so no caching.
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<n_tiles, kWarps * 32, shared_bytes, stream>>>(a);
  return cudaGetLastError();
}

template <int kWarps>
cudaError_t launch_rows(const MatmulArgs& a, int n_tiles, bool staged, size_t shared_bytes, cudaStream_t stream) {
  const bool two = a.rows > 8;
  if (staged) return two ? launch<kWarps, 2, true>(a, n_tiles, shared_bytes, stream)
                         : launch<kWarps, 1, true>(a, n_tiles, shared_bytes, stream);
  return two ? launch<kWarps, 2, false>(a, n_tiles, 0, stream) : launch<kWarps, 1, false>(a, n_tiles, 0, stream);
}

}  // namespace

cudaError_t matmul(const MatmulArgs& a, int n_tiles, int warps, bool staged, cudaStream_t stream) {
  const size_t shared_bytes = staged ? size_t(a.rows) * a.x_stride * sizeof(half) : 0;
  return warps == 4 ? launch_rows<4>(a, n_tiles, staged, shared_bytes, stream)
                    : launch_rows<8>(a, n_tiles, staged, shared_bytes, stream);
}

cudaError_t dequantize(const DequantArgs& a, cudaStream_t stream) {
  const size_t threads = size_t(a.n_tiles) * a.k_tiles * 32;
  const int block = 256;
  dequantize_kernel<<<unsigned((threads + block - 1) / block), block, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace q4
