// Launch interface of the decode attention over a 4-bit KV cache (cache_attention.cu), for the binding.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace q4 {

// One decode step's attention parts over a 4-bit cache, in the form of fused.py's Triton parts kernel,
// whose merge kernel combines them: for KV head h, split s and query row r (of `rows`, at most 8), part
// (h * splits + s) * rows + r holds the unnormalized output, a reference near the largest score (part_max)
// and the sum of exp(score - reference) over the split's slots. Split s takes slots s P .. s P + P - 1, P
// being the length over the splits rounded up to whole tiles of 16 slots; a split past the length holds
// -inf, 0 and zeros.
struct CacheAttentionArgs {
  const half* q;           // query row r: q + (r / group) * q_row_stride + (h * group + r % group) * dim
  int q_row_stride;
  int group;               // query heads per KV head
  int rows;                // query rows per KV head, 1..8
  uint8_t* keys;           // [kv_heads, max_seq, dim / 2], entry j low nibble, entry dim / 2 + j high
  half* key_scales;        // [kv_heads, max_seq, dim / 32, 2]: (scale, minimum) per 32 entries
  uint8_t* values;         // written only at a decode step's own slot (new_keys)
  half* value_scales;
  int max_seq;
  const int64_t* length;   // slots 0 .. *length + length_bias - 1 are attended to
  int length_bias;
  int splits;
  float scale;             // of the scores, dim^-0.5
  float* part_out;         // [kv_heads * splits * rows, dim]
  float* part_max;         // [kv_heads * splits * rows]: what the part's sum and out are taken against,
                           // exp(score - part_max); within ~7.6 of its largest score, -inf where it has no slots
  float* part_sum;
  // A decode step's own token, or null: its key and value [kv_heads, dim] (heads contiguous) before RoPE, which
  // the kernel stores at slot *length (the key rotated), and the position's rotary rows cos and sin [dim / 2],
  // by which it rotates q as it reads it. length_bias is then 1.
  const half* new_keys;
  const half* new_values;
  const half* cos;
  const half* sin;
};

// dim is 64 or 128. overlap: launch as a programmatic dependent (sm_90+), as the Triton kernels around
// it are.
cudaError_t cache_attention_parts(const CacheAttentionArgs& args, int dim, int kv_heads, bool overlap,
                                  cudaStream_t stream);

// How many blocks of the kernel for heads of `dim` entries the current GPU holds at once.
cudaError_t cache_attention_resident_blocks(int dim, int* blocks);

}  // namespace q4
