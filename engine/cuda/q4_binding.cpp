// PyTorch binding for the 4-bit kernels (weights and KV cache): checks the tensors, picks the launch,
// reports CUDA errors.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstdint>
#include <optional>

#include "cache_attention.h"
#include "q4_kernels.h"

namespace {

constexpr int kSliceN = 32;
constexpr int kTileK = 64;
constexpr int kStepK = 2 * kTileK;  // inputs are padded to a multiple
constexpr int kMaxRows = 16;
// The epilogue copies a LoRA update's factors into shared memory 16 bytes at a time, and has room for b
// up to this rank and for this many bytes of h; any other update is added by a product of its own after
// the kernel.
constexpr int64_t kMaxEpilogueRank = 256;
constexpr int64_t kMaxEpilogueHBytes = 16 * 1024;

bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// h: float32 [parts, rows, rank].
bool epilogue_takes(const torch::Tensor& h, const torch::Tensor& b) {
  const int64_t rank = b.size(1);
  return rank % 8 == 0 && rank <= kMaxEpilogueRank && h.numel() * 4 <= kMaxEpilogueHBytes && h.stride(0) % 4 == 0 &&
         h.stride(1) % 4 == 0 && aligned16(h) && aligned16(b);
}

void check_prepared(const torch::Tensor& weights, const torch::Tensor& scales, int64_t in_features,
                    int64_t out_features, bool paired) {
  TORCH_CHECK(weights.is_cuda() && weights.scalar_type() == torch::kInt32 && weights.is_contiguous() &&
                  weights.dim() == 5 && weights.size(2) == 2 && weights.size(3) == 32 && weights.size(4) == 4,
              "q4: weights must be contiguous int32 CUDA [slices, k_tiles, 2, 32, 4]");
  TORCH_CHECK(scales.is_cuda() && scales.scalar_type() == torch::kFloat16 && scales.is_contiguous() &&
                  scales.dim() == 4 && scales.size(0) == weights.size(0) && scales.size(2) == 8 &&
                  scales.size(3) == 8,
              "q4: scales must be contiguous float16 CUDA [slices, groups, 8, 8]");
  TORCH_CHECK(weights.size(0) == (out_features + kSliceN - 1) / kSliceN &&
                  weights.size(1) == (in_features + kStepK - 1) / kStepK * 2 && in_features % 8 == 0,
              "q4: layer shape does not match the prepared weights");
  TORCH_CHECK(weights.numel() / 4 < (int64_t(1) << 32) && scales.numel() / 8 < (int64_t(1) << 32),
              "q4: layer too large for 32-bit indexing");
  TORCH_CHECK(weights.get_device() == scales.get_device(), "q4: weights and scales on different devices");
  TORCH_CHECK(!paired || out_features % kSliceN == 0, "q4: paired halves must fill whole slices");
}

// y[rows, out] = x[rows, in][:, perm] @ W^T for 1..16 rows. `folded`: every 128 inputs of a step share one
// group; `paired`: the outputs are two halves stored paired (q4_kernels.h). `gated` (paired only): y [rows,
// out / 2] gets silu(first half) * second half. `mode` (0 choose, 1 read x from global memory, 2 stage x in
// shared memory) and `overlap` (see q4_kernels.h) exist for tests and the benchmark.
torch::Tensor matmul(torch::Tensor x, torch::Tensor weights, torch::Tensor scales, std::optional<torch::Tensor> perm,
                     int64_t group_magic, bool folded, bool paired, int64_t out_features, torch::Tensor y,
                     std::optional<torch::Tensor> lora_h, std::optional<torch::Tensor> lora_b, bool gated,
                     int64_t mode, bool overlap) {
  const int64_t in_features = x.size(-1);
  check_prepared(weights, scales, in_features, out_features, paired);
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == torch::kFloat16 && x.dim() == 2,
              "q4: x must be a 2-D float16 CUDA tensor");
  TORCH_CHECK(x.get_device() == weights.get_device(), "q4: x is on another device than the weights");
  const int64_t rows = x.size(0);
  TORCH_CHECK(rows >= 1 && rows <= kMaxRows, "q4: the kernel takes 1 to 16 rows, got ", rows);
  TORCH_CHECK(!gated || (paired && !lora_b), "q4: a gated product needs paired halves and no LoRA update");
  const int64_t y_features = gated ? out_features / 2 : out_features;
  TORCH_CHECK(y.is_cuda() && y.scalar_type() == torch::kFloat16 && y.is_contiguous() && y.dim() == 2 &&
                  y.size(0) == rows && y.size(1) == y_features && y.get_device() == x.get_device(),
              "q4: y must be a contiguous float16 CUDA tensor [rows, out_features], or [rows, out_features / 2] "
              "gated");
  TORCH_CHECK(mode >= 0 && mode <= 2, "q4: mode must be 0, 1 or 2");
  if (perm) {
    TORCH_CHECK(perm->is_cuda() && perm->scalar_type() == torch::kInt32 && perm->is_contiguous() &&
                    perm->numel() == in_features,
                "q4: perm must be a contiguous int32 CUDA tensor of in_features entries");
  }
  TORCH_CHECK(lora_h.has_value() == lora_b.has_value(), "q4: a LoRA update needs both h and b");
  if (lora_b) {
    TORCH_CHECK(lora_b->is_cuda() && lora_b->scalar_type() == torch::kFloat16 && lora_b->is_contiguous() &&
                    lora_b->dim() == 2 && lora_b->size(0) == out_features && lora_b->get_device() == x.get_device(),
                "q4: LoRA b must be a contiguous float16 CUDA tensor [out_features, rank] on x's device");
    TORCH_CHECK(lora_h->is_cuda() && lora_h->is_floating_point() && (lora_h->dim() == 2 || lora_h->dim() == 3) &&
                    lora_h->size(-2) == rows && lora_h->size(-1) == lora_b->size(1) && lora_h->stride(-1) == 1 &&
                    lora_h->get_device() == x.get_device(),
                "q4: LoRA h must be a CUDA tensor [rows, rank], or partial sums [parts, rows, rank], with contiguous "
                "rows on x's device");
  }
  // h as float32 partial sums, the form the fused products write.
  torch::Tensor h;
  if (lora_b && lora_b->size(1) > 0) {
    h = lora_h->dim() == 2 ? lora_h->unsqueeze(0) : *lora_h;
    if (h.scalar_type() != torch::kFloat) h = h.to(torch::kFloat);
  }

  const c10::cuda::CUDAGuard guard(x.device());
  const bool in_epilogue = h.defined() && epilogue_takes(h, *lora_b);
  const int64_t epilogue_rank = in_epilogue ? lora_b->size(1) : 0, parts = in_epilogue ? h.size(0) : 1;
  const int64_t k_tiles = weights.size(1);
  const int64_t x_stride = k_tiles * kTileK + 8;  // +8 halves: rows land on different banks
  // x goes to shared memory when it fits (measured faster, and perm is gathered on the way); a
  // larger x is read from global memory, after a separate gather pass if the layer has a perm. So is the x
  // of a product whose blocks split their inputs, unless it has a perm: such a block owns one slice and
  // needs half of x once, where staging would copy all of it and hold the block at a barrier before its
  // first step (measured slower in a decode step, bench/NOTES.md session 16).
  const bool fits =
      rows * x_stride * 2 <= int64_t(q4::max_staged_bytes(int(rows), int(epilogue_rank), int(parts), folded));
  const bool reads_x_once = !perm && q4::splits_inputs(int(out_features), gated, int(epilogue_rank));
  const bool staged = mode == 2 || (mode == 0 && fits && !reads_x_once);
  TORCH_CHECK(!staged || fits, "q4: x is too large to stage in shared memory");
  // The kernel reads x with 16-byte loads: copy a misaligned view, gather an unstaged perm.
  if (!staged && perm) x = x.index_select(1, *perm);
  x = x.contiguous();
  if (!aligned16(x)) x = x.clone();

  q4::MatmulArgs args{};
  args.x = reinterpret_cast<const half*>(x.data_ptr<at::Half>());
  args.rows = int(rows);
  args.in_features = int(in_features);
  args.perm = staged && perm ? perm->data_ptr<int32_t>() : nullptr;
  args.x_stride = int(x_stride);
  args.weights = reinterpret_cast<const uint4*>(weights.data_ptr<int32_t>());
  args.scales = reinterpret_cast<const uint4*>(scales.data_ptr<at::Half>());
  args.k_tiles = int(k_tiles);
  args.groups_pad = int(scales.size(1));
  args.group_magic = uint32_t(group_magic);
  args.folded = folded;
  args.y = reinterpret_cast<half*>(y.data_ptr<at::Half>());
  args.out_features = int(out_features);
  args.paired = paired;
  args.gated = gated;
  if (in_epilogue) {
    args.lora_h = h.data_ptr<float>();
    args.lora_h_stride = int(h.stride(1));
    args.lora_parts = int(parts);
    args.lora_part_stride = int(h.stride(0));
    args.lora_b = reinterpret_cast<const half*>(lora_b->data_ptr<at::Half>());
    args.lora_rank = int(epilogue_rank);
  }
  const cudaError_t err = q4::matmul(args, staged, overlap, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "q4 matmul launch failed (", rows, " rows, x ",
              staged ? "in shared memory" : "from global memory", "): ", cudaGetErrorString(err));
  if (h.defined() && !in_epilogue) y.addmm_(h.sum(0).to(y.scalar_type()), lora_b->t());
  return y;
}

// The dense float16 [out, in] weight, for row counts where a cuBLAS product beats the kernel.
torch::Tensor dequantize(torch::Tensor weights, torch::Tensor scales, int64_t group_magic, int64_t in_features,
                         int64_t out_features, bool paired) {
  check_prepared(weights, scales, in_features, out_features, paired);
  const c10::cuda::CUDAGuard guard(weights.device());
  auto w = torch::empty({out_features, in_features}, scales.options());
  q4::DequantArgs args{};
  args.weights = reinterpret_cast<const uint4*>(weights.data_ptr<int32_t>());
  args.scales = reinterpret_cast<const uint4*>(scales.data_ptr<at::Half>());
  args.slices = int(weights.size(0));
  args.k_tiles = int(weights.size(1));
  args.groups_pad = int(scales.size(1));
  args.group_magic = uint32_t(group_magic);
  args.in_features = int(in_features);
  args.out_features = int(out_features);
  args.paired = paired;
  args.w = reinterpret_cast<half*>(w.data_ptr<at::Half>());
  const cudaError_t err = q4::dequantize(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "q4 dequantize launch failed: ", cudaGetErrorString(err));
  return w;
}

// One 4-bit half of a KV cache, as cache.CacheTensor.kernel_args gives it for one batch row: entries
// uint8 [kv_heads, slots, dim / 2], scales float16 [kv_heads, slots, dim / 32, 2].
void check_cache_part(const torch::Tensor& data, const torch::Tensor& scales, const torch::Tensor& like,
                      const char* name) {
  TORCH_CHECK(data.is_cuda() && data.scalar_type() == torch::kUInt8 && data.is_contiguous() && data.dim() == 3 &&
                  aligned16(data) && data.get_device() == like.get_device(),
              "q4 cache attention: ", name, " must be contiguous uint8 CUDA [kv_heads, slots, dim / 2] on q's device");
  TORCH_CHECK(scales.is_cuda() && scales.scalar_type() == torch::kFloat16 && scales.is_contiguous() &&
                  scales.dim() == 4 && scales.size(0) == data.size(0) && scales.size(1) == data.size(1) &&
                  scales.size(2) * 16 == data.size(2) && scales.size(3) == 2 && aligned16(scales) &&
                  scales.get_device() == like.get_device(),
              "q4 cache attention: ", name, " scales must be contiguous float16 CUDA [kv_heads, slots, dim / 32, 2]");
}

// A float16 CUDA tensor on `like`'s device, its entries 8-byte aligned for the kernel's vector loads.
bool half_on_device_of(const torch::Tensor& t, const torch::Tensor& like) {
  return t.is_cuda() && t.scalar_type() == torch::kFloat16 && t.get_device() == like.get_device() &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 8 == 0;
}

// The parts of one decode step's attention over a 4-bit KV cache (cache_attention.h) into part_out,
// part_max and part_sum, for fused.py's merge kernel: q [n, heads, dim] (rows apart by any stride), n
// times heads / kv_heads query rows per KV head, at most 8; slots 0 .. length + length_bias - 1. With
// new_keys, new_values [kv_heads, dim] and the rotary rows cos, sin [dim / 2] of one token (n = 1, length_bias
// 1): store the token's key, rotated, and value at slot `length`, and rotate q as it is read.
void cache_attention_parts(torch::Tensor q, torch::Tensor keys, torch::Tensor key_scales, torch::Tensor values,
                           torch::Tensor value_scales, torch::Tensor length, int64_t length_bias, int64_t splits,
                           double scale, torch::Tensor part_out, torch::Tensor part_max, torch::Tensor part_sum,
                           std::optional<torch::Tensor> new_keys, std::optional<torch::Tensor> new_values,
                           std::optional<torch::Tensor> cos, std::optional<torch::Tensor> sin) {
  TORCH_CHECK(half_on_device_of(q, q) && q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2) &&
                  (q.size(0) == 1 || q.stride(0) % 4 == 0),
              "q4 cache attention: q must be float16 CUDA [n, heads, dim] with contiguous heads, rows 8-byte aligned");
  check_cache_part(keys, key_scales, q, "keys");
  check_cache_part(values, value_scales, q, "values");
  const int64_t dim = q.size(2), kv_heads = keys.size(0);
  TORCH_CHECK(dim == 64 || dim == 128, "q4 cache attention: heads of 64 or 128 entries, got ", dim);
  TORCH_CHECK(keys.size(2) * 2 == dim && values.sizes() == keys.sizes(),
              "q4 cache attention: the cache's heads do not match q's");
  TORCH_CHECK(q.size(1) % kv_heads == 0, "q4 cache attention: ", q.size(1), " query heads for ", kv_heads,
              " KV heads");
  const int64_t group = q.size(1) / kv_heads, rows = q.size(0) * group;
  TORCH_CHECK(rows >= 1 && rows <= 8, "q4 cache attention: 1 to 8 query rows per KV head, got ", rows);
  TORCH_CHECK(length.is_cuda() && length.scalar_type() == torch::kLong && length.numel() == 1 &&
                  length.get_device() == q.get_device(),
              "q4 cache attention: length must be a one-element int64 CUDA tensor");
  TORCH_CHECK(splits >= 1, "q4 cache attention: splits must be positive");
  const bool with_new = new_keys.has_value();
  TORCH_CHECK(new_values.has_value() == with_new && cos.has_value() == with_new && sin.has_value() == with_new,
              "q4 cache attention: a new token needs its keys, values, cos and sin together");
  if (with_new) {
    for (const torch::Tensor* t : {&*new_keys, &*new_values})
      TORCH_CHECK(half_on_device_of(*t, q) && t->dim() == 2 && t->size(0) == kv_heads && t->size(1) == dim &&
                      t->stride(1) == 1 && (kv_heads == 1 || t->stride(0) == dim),
                  "q4 cache attention: the new keys and values must be float16 CUDA [kv_heads, dim], contiguous");
    for (const torch::Tensor* t : {&*cos, &*sin})
      TORCH_CHECK(half_on_device_of(*t, q) && t->is_contiguous() && t->numel() >= dim / 2,
                  "q4 cache attention: cos and sin must be contiguous float16 CUDA rows of at least dim / 2");
    TORCH_CHECK(q.size(0) == 1 && length_bias == 1, "q4 cache attention: a new token is one sequence's, at slot "
                "length (length_bias 1)");
  }
  const int64_t parts = kv_heads * splits * rows;
  for (const torch::Tensor* t : {&part_out, &part_max, &part_sum})
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == torch::kFloat && t->is_contiguous() &&
                    t->numel() == parts * (t == &part_out ? dim : 1) && t->get_device() == q.get_device(),
                "q4 cache attention: the part outputs must be contiguous float32 CUDA tensors of ", parts,
                " rows");

  const c10::cuda::CUDAGuard guard(q.device());
  q4::CacheAttentionArgs args{};
  args.q = reinterpret_cast<const half*>(q.data_ptr<at::Half>());
  args.q_row_stride = int(q.stride(0));
  args.group = int(group);
  args.rows = int(rows);
  args.keys = keys.data_ptr<uint8_t>();
  args.key_scales = reinterpret_cast<half*>(key_scales.data_ptr<at::Half>());
  args.values = values.data_ptr<uint8_t>();
  args.value_scales = reinterpret_cast<half*>(value_scales.data_ptr<at::Half>());
  args.max_seq = int(keys.size(1));
  args.length = length.data_ptr<int64_t>();
  args.length_bias = int(length_bias);
  args.splits = int(splits);
  args.scale = float(scale);
  args.part_out = part_out.data_ptr<float>();
  args.part_max = part_max.data_ptr<float>();
  args.part_sum = part_sum.data_ptr<float>();
  if (with_new) {
    args.new_keys = reinterpret_cast<const half*>(new_keys->data_ptr<at::Half>());
    args.new_values = reinterpret_cast<const half*>(new_values->data_ptr<at::Half>());
    args.cos = reinterpret_cast<const half*>(cos->data_ptr<at::Half>());
    args.sin = reinterpret_cast<const half*>(sin->data_ptr<at::Half>());
  }
  const cudaError_t err =
      q4::cache_attention_parts(args, int(dim), int(kv_heads), true, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "q4 cache attention launch failed: ", cudaGetErrorString(err));
}

int64_t cache_attention_resident_blocks(int64_t dim) {
  TORCH_CHECK(dim == 64 || dim == 128, "q4 cache attention: heads of 64 or 128 entries, got ", dim);
  int blocks = 0;
  const cudaError_t err = q4::cache_attention_resident_blocks(int(dim), &blocks);
  TORCH_CHECK(err == cudaSuccess, "q4 cache attention: ", cudaGetErrorString(err));
  return blocks;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matmul", &matmul, "4-bit matrix product for 1..16 rows, optionally with SwiGLU's activation (writes and "
        "returns y)");
  m.def("dequantize", &dequantize, "dense float16 [out, in] weight from the prepared layout");
  m.def("cache_attention_parts", &cache_attention_parts, "one decode step's attention parts over a 4-bit KV cache");
  m.def("cache_attention_resident_blocks", &cache_attention_resident_blocks,
        "blocks of the 4-bit cache attention for heads of this size that the current GPU holds at once");
  m.def("max_staged_bytes", &q4::max_staged_bytes, "bytes of x the kernel can stage for this many rows, beside a "
        "LoRA update of this rank with h in this many parts, on the folded path or not");
}
