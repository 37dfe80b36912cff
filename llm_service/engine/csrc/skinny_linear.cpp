// y = x @ W^T (+ bias) for a few rows of x (decode steps of a few sequences), CPU.
//
// With one to eight rows a linear layer is a stream over its weight: the time is the time
// to read W once. oneDNN's kernels reach about 60% of this machine's read bandwidth there;
// this one streams each thread's share of W's rows once and applies it to every row of x,
// so it runs at the memory's speed. fp32 or bf16 weights, fp32 accumulation.
//
// Registered as torch.ops.mmserve.skinny_linear.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_math.h"

namespace {

using mmserve::store;
using mmserve::to_float;

constexpr int64_t kMaxRows = 8;

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Weight rows [begin, end) against M rows of x (fp32, K a multiple of 16).
template <typename T, int M>
void rows_avx512(const float* x, const T* w, const T* bias, T* y, int64_t K, int64_t N,
                 int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    const T* row = w + n * K;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      if (k + 256 < K) _mm_prefetch(reinterpret_cast<const char*>(row + k + 256), _MM_HINT_T0);
      const __m512 wv = load16(row + k);
      for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[m]);
    }
    const float b = bias ? to_float(bias[n]) : 0.0f;
    for (int m = 0; m < M; ++m) store(y + m * N + n, _mm512_reduce_add_ps(acc[m]) + b);
  }
}
#endif

template <typename T>
void rows_generic(const float* x, const T* w, const T* bias, T* y, int64_t M, int64_t K,
                  int64_t N, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    const T* row = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < K; ++k) dot += xm[k] * to_float(row[k]);
      store(y + m * N + n, dot + (bias ? to_float(bias[n]) : 0.0f));
    }
  }
}

template <typename T>
void skinny(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
            at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  // x once in fp32, shared by all threads
  std::vector<float> xf(M * K);
  const T* xp = x.data_ptr<T>();
  for (int64_t i = 0; i < M * K; ++i) xf[i] = to_float(xp[i]);
  const T* wp = w.data_ptr<T>();
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  // Grain: about 64 KiB of weight per task, so small layers stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (K * static_cast<int64_t>(sizeof(T))));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
#if defined(__AVX512F__)
    if (K % 16 == 0) {
      switch (M) {
        case 1: return rows_avx512<T, 1>(xf.data(), wp, bp, yp, K, N, begin, end);
        case 2: return rows_avx512<T, 2>(xf.data(), wp, bp, yp, K, N, begin, end);
        case 3: return rows_avx512<T, 3>(xf.data(), wp, bp, yp, K, N, begin, end);
        case 4: return rows_avx512<T, 4>(xf.data(), wp, bp, yp, K, N, begin, end);
        case 5: return rows_avx512<T, 5>(xf.data(), wp, bp, yp, K, N, begin, end);
        case 6: return rows_avx512<T, 6>(xf.data(), wp, bp, yp, K, N, begin, end);
        case 7: return rows_avx512<T, 7>(xf.data(), wp, bp, yp, K, N, begin, end);
        case 8: return rows_avx512<T, 8>(xf.data(), wp, bp, yp, K, N, begin, end);
      }
    }
#endif
    rows_generic<T>(xf.data(), wp, bp, yp, M, K, N, begin, end);
  });
}

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(),
              "skinny_linear: x must be a contiguous CPU [rows, in]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "skinny_linear takes 1 to ", kMaxRows,
              " rows, got ", x.size(0));
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == x.size(1) &&
                  weight.scalar_type() == x.scalar_type(),
              "skinny_linear: weight must be a contiguous [out, in] of x's dtype");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type(),
                "skinny_linear: bias must be a contiguous [out] of x's dtype");
  }
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  if (x.scalar_type() == at::kFloat) {
    skinny<float>(x, weight, bias, y);
  } else if (x.scalar_type() == at::kBFloat16) {
    skinny<c10::BFloat16>(x, weight, bias, y);
  } else {
    TORCH_CHECK(false, "skinny_linear supports float32 and bfloat16, got ", x.scalar_type());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmserve, m) {
  m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmserve, CPU, m) { m.impl("skinny_linear", &skinny_linear); }
