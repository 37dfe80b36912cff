// Fused element-wise steps of a decoder layer (CPU, fp32 and bf16).
//
// A decode step of a small model is hundreds of tiny torch ops; each costs microseconds of
// dispatch whatever its size. These kernels do in one op what the plain-torch path does in
// several, with the same rounding: in bf16 every intermediate that torch would round to bf16
// is rounded here too, so both paths agree to the last bit in most positions.
//
//   add_rms_norm   residual += x (in place), then RMSNorm(residual) * weight
//   rms_norm       RMSNorm(x) * weight
//   rope_and_cache rotates q and k inside the fused qkv rows (in place) and writes k, v into
//                  the paged cache at their slots
//   silu_and_mul   silu(gate) * up over [gate | up] rows
//   argmax_rows    each row's first maximum, as torch.argmax(dim=-1) gives it (a NaN counts
//                  as the maximum); greedy decoding's whole sampler

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

using mmserve::round_as;
using mmserve::store;
using mmserve::to_float;

// Rows per parallel task: small steps (one decode row) run inline, without waking threads.
constexpr int64_t kRowGrain = 16;

template <typename T>
void rms_norm_rows(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t size,
                   float eps) {
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* res = residual ? residual + r * size : nullptr;
      const T* src = x + r * size;
      float sum = 0.0f;
      if (res) {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < size; ++i) {
          const float v = round_as(to_float(res[i]) + to_float(src[i]), T());
          store(res + i, v);
          sum += v * v;
        }
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < size; ++i) sum += to_float(src[i]) * to_float(src[i]);
      }
      const float inv = 1.0f / std::sqrt(sum / static_cast<float>(size) + eps);
      const T* normed = res ? res : src;
      T* dst = out + r * size;
#pragma omp simd
      for (int64_t i = 0; i < size; ++i) {
        const float n = round_as(to_float(normed[i]) * inv, T());
        store(dst + i, to_float(weight[i]) * n);
      }
    }
  });
}

void check_rows(const at::Tensor& x, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), name,
              ": x must be a contiguous CPU [rows, hidden]");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type(),
              name, ": weight must be a contiguous [hidden] of x's dtype");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight, "rms_norm");
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), nullptr, weight.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), x.size(0), x.size(1),
                            static_cast<float>(eps));
  });
  return out;
}

at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor residual, const at::Tensor& weight,
                        double eps) {
  check_rows(x, weight, "add_rms_norm");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.is_contiguous() &&
                  residual.scalar_type() == x.scalar_type(),
              "add_rms_norm: residual must be a contiguous tensor like x");
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(),
                            weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0),
                            x.size(1), static_cast<float>(eps));
  });
  return out;
}

// HF's rotate_half layout over the first rotary_dim dims of each head:
// out = x * cos + [-x2, x1] * sin, each product rounded to T before the sum.
template <typename T>
inline void rotate_head(T* head, const T* cos, const T* sin, int64_t rotary_dim) {
  const int64_t half = rotary_dim / 2;
  float first[512];
  for (int64_t i = 0; i < half; ++i) first[i] = to_float(head[i]);
  for (int64_t i = 0; i < rotary_dim; ++i) {
    const float x = i < half ? first[i] : to_float(head[i]);
    const float partner = i < half ? -to_float(head[i + half]) : first[i - half];
    const float a = round_as(x * to_float(cos[i]), T());
    const float b = round_as(partner * to_float(sin[i]), T());
    store(head + i, a + b);
  }
}

template <typename T>
void rope_and_cache_rows(T* qkv, const T* cos, const T* sin, const int64_t* positions,
                         T* k_cache, T* v_cache, const int64_t* slots, int64_t rows,
                         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                         int64_t rotary_dim, int64_t block_size) {
  const int64_t row_size = (num_heads + 2 * num_kv_heads) * head_dim;
  const int64_t kv_size = num_kv_heads * head_dim, head_stride = block_size * head_dim;
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = qkv + r * row_size;
      const T* c = cos + positions[r] * rotary_dim;
      const T* s = sin + positions[r] * rotary_dim;
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
        rotate_head(row + h * head_dim, c, s, rotary_dim);
      }
      // Slot s is row s % block_size of block s / block_size, in each KV head's run.
      const T* k = row + num_heads * head_dim;
      const int64_t at = slots[r] / block_size * num_kv_heads * head_stride +
                         slots[r] % block_size * head_dim;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        std::memcpy(k_cache + at + h * head_stride, k + h * head_dim, head_dim * sizeof(T));
        std::memcpy(v_cache + at + h * head_stride, k + kv_size + h * head_dim,
                    head_dim * sizeof(T));
      }
    }
  });
}

void rope_and_cache(at::Tensor qkv, const at::Tensor& cos, const at::Tensor& sin,
                    const at::Tensor& positions, at::Tensor k_cache, at::Tensor v_cache,
                    const at::Tensor& slot_mapping, int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 2 && qkv.is_contiguous(),
              "rope_and_cache: qkv must be a contiguous CPU [rows, (heads + 2 kv_heads) * dim]");
  const int64_t head_dim = k_cache.size(-1), rotary_dim = cos.size(1);
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim,
              "rope_and_cache: qkv width does not match the heads");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.dim() == 2 && rotary_dim <= head_dim && rotary_dim % 2 == 0 &&
                  rotary_dim <= 1024,
              "rope_and_cache: cos and sin must be contiguous [positions, rotary_dim]");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && k_cache.scalar_type() == qkv.scalar_type() &&
                  v_cache.scalar_type() == qkv.scalar_type(),
              "rope_and_cache: qkv, cos, sin and the cache must share a dtype");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && k_cache.size(1) == num_kv_heads,
              "rope_and_cache: the caches must be contiguous [blocks, kv_heads, block_size, "
              "head_dim]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slot_mapping.scalar_type() == at::kLong &&
                  positions.numel() == qkv.size(0) && slot_mapping.numel() == qkv.size(0) &&
                  positions.is_contiguous() && slot_mapping.is_contiguous(),
              "rope_and_cache: positions and slot_mapping must be int64 [rows]");
  const int64_t num_slots = k_cache.numel() / (num_kv_heads * head_dim);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t r = 0; r < qkv.size(0); ++r) {
    TORCH_CHECK(pos[r] >= 0 && pos[r] < cos.size(0), "rope_and_cache: position ", pos[r],
                " is outside the rotary table");
    TORCH_CHECK(slots[r] >= 0 && slots[r] < num_slots, "rope_and_cache: slot ", slots[r],
                " is outside the cache");
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "rope_and_cache", [&] {
    rope_and_cache_rows<scalar_t>(qkv.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(),
                                  sin.data_ptr<scalar_t>(), pos, k_cache.data_ptr<scalar_t>(),
                                  v_cache.data_ptr<scalar_t>(), slots, qkv.size(0), num_heads,
                                  num_kv_heads, head_dim, rotary_dim, k_cache.size(2));
  });
}

// silu as torch computes it (in fp32, then rounded to T), times up, rounded to T.
template <typename T>
void silu_and_mul_rows(const T* gate_up, T* out, int64_t rows, int64_t size) {
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = gate_up + r * 2 * size;
      const T* up = gate + size;
      T* dst = out + r * size;
#pragma omp simd
      for (int64_t i = 0; i < size; ++i) {
        const float s = round_as(mmserve::silu(to_float(gate[i])), T());
        store(dst + i, s * to_float(up[i]));
      }
    }
  });
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu() && gate_up.dim() == 2 && gate_up.is_contiguous() &&
                  gate_up.size(1) % 2 == 0,
              "silu_and_mul: gate_up must be a contiguous CPU [rows, 2 * size]");
  const int64_t size = gate_up.size(1) / 2;
  at::Tensor out = at::empty({gate_up.size(0), size}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate_up.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                gate_up.size(0), size);
  });
  return out;
}

// torch.argmax over a row of the vocabulary runs a scalar compare-and-index loop (1.1 ms for
// 64 rows of 49k fp32 logits on 2 cores, where amax takes 0.09 ms). Here: the row's maximum
// chunk by chunk with vector max reductions, remembering the first chunk that raised it,
// then a scan of that chunk alone for its first position.
constexpr int64_t kArgmaxChunk = 256;

template <typename T>
int64_t argmax_row(const T* x, int64_t size) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t best_chunk = 0;
  int nans = 0;
  for (int64_t c = 0; c < size; c += kArgmaxChunk) {
    const int64_t end = std::min(size, c + kArgmaxChunk);
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m) reduction(| : nans)
    for (int64_t i = c; i < end; ++i) {
      const float v = to_float(x[i]);
      m = v > m ? v : m;
      nans |= v != v;
    }
    if (m > best) {
      best = m;
      best_chunk = c;
    }
  }
  if (nans) {
    for (int64_t i = 0; i < size; ++i)
      if (to_float(x[i]) != to_float(x[i])) return i;
  }
  for (int64_t i = best_chunk; i < size; ++i)
    if (to_float(x[i]) == best) return i;
  return 0;  // unreachable: the chunk holds its maximum
}

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.stride(1) == 1 &&
                  logits.size(1) > 0,
              "argmax_rows: logits must be a CPU [rows, vocab] with dense rows");
  const int64_t rows = logits.size(0), size = logits.size(1), ld = logits.stride(0);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  int64_t* dst = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, logits.scalar_type(), "argmax_rows", [&] {
    const scalar_t* src = logits.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) dst[r] = argmax_row(src + r * ld, size);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
  m.def("rope_and_cache(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor positions, "
        "Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slot_mapping, int num_heads, "
        "int num_kv_heads) -> ()");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("argmax_rows(Tensor logits) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmserve, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope_and_cache", &rope_and_cache);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("argmax_rows", &argmax_rows);
}
