// Decode attention that reads K/V in place from the paged cache (CPU).
//
// One query row per sequence: each sequence attends to its first context_lens[s] cached
// tokens, found through its row of block_tables. Query heads that share a KV head are
// computed together, so each key and value row is loaded once per KV head. Plain C++ with
// `omp simd` loops: the compiler vectorizes them for the machine it is built on (AVX-512,
// AVX2, NEON), in fp32 and bf16 (accumulation in fp32).
//
// Registered as torch.ops.mmserve.paged_decode.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_math.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using mmserve::exp_nonpositive;
using mmserve::store;
using mmserve::to_float;

template <typename T>
void decode_kv_head(const T* q,             // the first query head of this KV head
                    const T* k_cache, const T* v_cache,
                    const int32_t* table,   // this sequence's block ids
                    int64_t context_len, int64_t block_size, int64_t kv_stride,
                    int64_t group, int64_t q_head_stride, int64_t head_dim, float scale,
                    T* out,                 // [group, head_dim]
                    std::vector<float>& scratch) {
  scratch.resize(group * (head_dim * 2 + context_len));
  float* qf = scratch.data();                      // [group, head_dim], pre-scaled
  float* acc = qf + group * head_dim;              // [group, head_dim]
  float* scores = acc + group * head_dim;          // [group, context_len]
  for (int64_t g = 0; g < group; ++g) {
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) {
      qf[g * head_dim + d] = to_float(q[g * q_head_stride + d]) * scale;
    }
  }
  for (int64_t t = 0; t < context_len; ++t) {
    const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
    const T* k = k_cache + slot * kv_stride;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf + g * head_dim;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * to_float(k[d]);
      scores[g * context_len + t] = dot;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * context_len;
    float top = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : top)
    for (int64_t t = 0; t < context_len; ++t) top = s[t] > top ? s[t] : top;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < context_len; ++t) {
      s[t] = exp_nonpositive(s[t] - top);
      sum += s[t];
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t t = 0; t < context_len; ++t) s[t] *= inv;
  }
  std::fill(acc, acc + group * head_dim, 0.0f);
  for (int64_t t = 0; t < context_len; ++t) {
    const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
    const T* v = v_cache + slot * kv_stride;
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * context_len + t];
      float* a = acc + g * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) a[d] += p * to_float(v[d]);
    }
  }
  for (int64_t i = 0; i < group * head_dim; ++i) store(out + i, acc[i]);
}

template <typename T>
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
            at::Tensor& out) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, width = block_tables.size(1);
  const int64_t q_row_stride = q.stride(0), q_head_stride = q.stride(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  const int64_t kv_stride = num_kv_heads * head_dim;  // between consecutive slots
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / num_kv_heads, h = item % num_kv_heads;
      decode_kv_head<T>(qp + s * q_row_stride + h * group * q_head_stride, kp + h * head_dim,
                        vp + h * head_dim, tables + s * width, lens[s], block_size, kv_stride,
                        group, q_head_stride, head_dim, static_cast<float>(scale),
                        op + (s * num_heads + h * group) * head_dim, scratch);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        double scale) {
  TORCH_CHECK(q.device().is_cpu(), "paged_decode runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) >= q.size(2),
              "q must be [seqs, heads, head_dim] with a dense head_dim");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes(),
              "k_cache and v_cache must be contiguous [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(k_cache.size(3) == q.size(2), "head_dim of q and the cache differ");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block_tables and context_lens must be int32");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.is_contiguous() &&
                  block_tables.size(0) == q.size(0),
              "block_tables must be a contiguous [seqs, max_blocks]");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.is_contiguous() &&
                  context_lens.size(0) == q.size(0),
              "context_lens must be a contiguous [seqs]");
  // Every block a sequence reads must exist: a bad table is an error, not a stray read.
  const int64_t block_size = k_cache.size(1), num_blocks = k_cache.size(0);
  const int64_t width = block_tables.size(1);
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  for (int64_t s = 0; s < q.size(0); ++s) {
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= width * block_size, "context_lens[", s, "]=", lens[s],
                " is outside [1, ", width * block_size, "] (the block table's capacity)");
    for (int64_t b = 0; b < (lens[s] + block_size - 1) / block_size; ++b) {
      const int32_t id = tables[s * width + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, "block_tables[", s, ", ", b, "]=", id,
                  " is not a block of the cache (", num_blocks, " blocks)");
    }
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.scalar_type() == at::kFloat) {
    decode<float>(q, k_cache, v_cache, block_tables, context_lens, scale, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    decode<c10::BFloat16>(q, k_cache, v_cache, block_tables, context_lens, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode supports float32 and bfloat16, got ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(mmserve, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmserve, CPU, m) { m.impl("paged_decode", &paged_decode); }
