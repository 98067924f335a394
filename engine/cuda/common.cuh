// What the 4-bit weight kernels (q4_kernels.cu) and the 4-bit cache attention (cache_attention.cu)
// share: bit casts, turning 4-bit levels into float16 without a conversion instruction, the m16n8k16
// tensor-core product, copies into shared memory, and programmatic dependent launch.
#pragma once

#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace q4 {

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

// (a & b) | c in one instruction; written out because the compiler splits it in two when b and
// c are both constants (an instruction takes one immediate).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Or-ing the nibbles at bits 0-3 and 16-19 of a word into the mantissa of 1024.0 gives the half2
// (1024 + l0, 1024 + l1), exact; the nibbles at bits 4-7 and 20-23 give (1024 + 16 l0, 1024 + 16 l1).
constexpr uint32_t kLowNibbles = 0x000F000Fu, kHighNibbles = 0x00F000F0u, kHalf1024 = 0x64006400u;

__device__ __forceinline__ uint32_t biased_levels(uint32_t word, uint32_t nibble_mask) {
  return and_or(word, nibble_mask, kHalf1024);
}

// scale * l + offset from biased_levels' (1024 + l) (high = false) or (1024 + 16 l) (high = true): l is
// recovered exactly first, so the only rounding is the fused multiply-add's.
__device__ __forceinline__ uint32_t dequantize_levels(uint32_t biased, bool high, __half2 scale, __half2 offset) {
  const __half2 k1024 = as_half2(kHalf1024);
  const __half2 kSixteenth = as_half2(0x2C002C00u);  // 1/16
  const __half2 kMinus64 = as_half2(0xD400D400u);    // -1024 / 16
  const __half2 levels = high ? __hfma2(as_half2(biased), kSixteenth, kMinus64) : __hsub2(as_half2(biased), k1024);
  return as_u32(__hfma2(levels, scale, offset));
}

// c += a b: a 16 x 16 float16 tile (row-major, four registers per lane), b 16 x 8 (two registers), c
// float32. Lane 4g + t holds a (g, 2t..2t+1), (g+8, 2t..2t+1), (g, 2t+8..2t+9), (g+8, 2t+8..2t+9); b (2t..2t+1,
// g), (2t+8..2t+9, g); c (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies from global to shared memory that the thread waits for later (cp.async, sm_80). Data read once
// per block bypasses L1 (16 bytes a copy); data that several lanes read goes through it (4, 8 or 16).
__device__ __forceinline__ void copy_bypassing_l1(void* shared, const void* global) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared_address(shared)), "l"(global));
}

template <int kBytes = 16>
__device__ __forceinline__ void copy_through_l1(void* shared, const void* global) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(shared_address(shared)), "l"(global), "n"(kBytes));
}

__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// Wait until at most kPending of this thread's most recent commit groups are still in flight.
template <int kPending>
__device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// Programmatic dependent launch (sm_90): the next kernel in the stream may start while this one
// finishes, and a kernel must not read what the previous kernel wrote before waiting for it.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_kernel() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Thread block clusters (sm_90): the cluster's barrier, and where `p` in this block's shared memory lies in
// block `rank`'s. Kernels reach them only when launched in clusters, which older GPUs never are; every thread
// of a block reaches each barrier (.aligned).
//
// The barrier comes in two halves. Arrive with `release` where this thread's writes (to any block's shared
// memory included) must be visible to the cluster's threads once they wait; a relaxed arrive costs no fence,
// which on sm_90 is a full memory barrier over the GPU. Wait acquires what the released arrivals wrote.
__device__ __forceinline__ void cluster_arrive(bool release) {
#if __CUDA_ARCH__ >= 900
  if (release) {
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
  } else {
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  }
#endif
}

__device__ __forceinline__ void cluster_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

// The whole barrier: every thread's writes are visible to every thread of the cluster after it.
__device__ __forceinline__ void cluster_sync() {
  cluster_arrive(true);
  cluster_wait();
}

template <typename T>
__device__ __forceinline__ T* cluster_shared(T* p, int rank) {
#if __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  return p;
#endif
}

// Launch kernel(args...) on grid x block threads, as a programmatic dependent of the previous kernel in
// `stream` where `overlap` asks for it and the GPU has it (sm_90+), in clusters of `cluster` blocks (sm_90+)
// where that is above 1.
template <typename Kernel, typename... Args>
cudaError_t launch_dependent(Kernel kernel, dim3 grid, dim3 block, size_t shared_bytes, bool overlap, int cluster,
                             cudaStream_t stream, const Args&... args) {
  int device = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attributes[2];
  config.attrs = attributes;
  if (overlap && major >= 9) {
    attributes[config.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[config.numAttrs++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster > 1) {
    if (major < 9) return cudaErrorNotSupported;
    attributes[config.numAttrs].id = cudaLaunchAttributeClusterDimension;
    attributes[config.numAttrs++].val.clusterDim = {unsigned(cluster), 1, 1};
  }
  return cudaLaunchKernelEx(&config, kernel, args...);
}

}  // namespace q4
