// y = x @ W^T (+ bias) in fp32 on CPUs whose widest vectors are AVX2 (+ FMA).
//
// oneDNN's AVX2 kernels lose about half the machine's FMA rate at the row counts of decode
// steps (16 rows: 85-95 GFLOP/s on 2 cores against 160-170 at 512 rows). This is the
// classic register-blocked kernel: W is packed once into panels of 16 output columns laid
// out k-major ([N / 16, K, 16]), and each step multiplies up to 6 rows of x by one panel
// with 12 accumulators, so every weight load feeds 6 rows and every x broadcast 2 FMAs.
// Threads split the panels; rows go in chunks that stay in L2 while a thread walks its
// panels, so W is read from memory once per chunk.
//
// Registered as torch.ops.mmserve.pack_panels and torch.ops.mmserve.panel_linear, for CPUs
// without AVX-512 (where there is, oneDNN's kernels are wider than this one). The model's
// projections do not call it yet: they run on oneDNN's packed weights.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kPanel = 16;       // output columns per panel
constexpr int64_t kRowBlock = 6;     // rows per register block
constexpr int64_t kRowChunk = 96;    // rows per chunk (96 x 1536 fp32 = 576 KiB at most)

#if defined(__AVX2__) && defined(__FMA__)
// The accumulators are named, not an array: gcc keeps an array of vectors on the stack and
// stores it back every iteration, which halves the kernel's speed.
template <int MR>
inline void block(const float* x, int64_t ldx, const float* panel, int64_t K, float* y,
                  int64_t ldy, const float* bias, const float* next) {
  static_assert(MR >= 1 && MR <= 6, "up to 6 rows per block");
  __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0,
         b3 = a0, a4 = a0, b4 = a0, a5 = a0, b5 = a0;
  const float* x0 = x;
  const float* x1 = x + ldx;
  const float* x2 = x + 2 * ldx;
  const float* x3 = x + 3 * ldx;
  const float* x4 = x + 4 * ldx;
  const float* x5 = x + 5 * ldx;
#define MMSERVE_ROW(i)                                   \
  if constexpr (MR > i) {                                \
    const __m256 v = _mm256_broadcast_ss(x##i + k);      \
    a##i = _mm256_fmadd_ps(v, w0, a##i);                 \
    b##i = _mm256_fmadd_ps(v, w1, b##i);                 \
  }
  for (int64_t k = 0; k < K; ++k) {
    // One cache line of the next panel per step: its read from memory overlaps this one's
    // arithmetic (a panel's row of 16 floats is one line).
    if (next) _mm_prefetch(reinterpret_cast<const char*>(next + k * kPanel), _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(panel + k * kPanel);
    const __m256 w1 = _mm256_loadu_ps(panel + k * kPanel + 8);
    MMSERVE_ROW(0) MMSERVE_ROW(1) MMSERVE_ROW(2) MMSERVE_ROW(3) MMSERVE_ROW(4) MMSERVE_ROW(5)
  }
#undef MMSERVE_ROW
  const __m256 c0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 c1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
#define MMSERVE_STORE(i)                                                  \
  if constexpr (MR > i) {                                                 \
    _mm256_storeu_ps(y + i * ldy, _mm256_add_ps(a##i, c0));               \
    _mm256_storeu_ps(y + i * ldy + 8, _mm256_add_ps(b##i, c1));           \
  }
  MMSERVE_STORE(0) MMSERVE_STORE(1) MMSERVE_STORE(2) MMSERVE_STORE(3) MMSERVE_STORE(4)
  MMSERVE_STORE(5)
#undef MMSERVE_STORE
}
#else
template <int MR>
inline void block(const float* x, int64_t ldx, const float* panel, int64_t K, float* y,
                  int64_t ldy, const float* bias, const float*) {
  float acc[MR][kPanel] = {};
  for (int64_t k = 0; k < K; ++k) {
    for (int m = 0; m < MR; ++m) {
      const float xv = x[m * ldx + k];
#pragma omp simd
      for (int64_t j = 0; j < kPanel; ++j) acc[m][j] += xv * panel[k * kPanel + j];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int64_t j = 0; j < kPanel; ++j) y[m * ldy + j] = acc[m][j] + (bias ? bias[j] : 0.0f);
}
#endif

// All rows of x against one panel; the first block also prefetches `next` (or nullptr).
void rows_by_panel(const float* x, int64_t rows, int64_t ldx, const float* panel, int64_t K,
                   float* y, int64_t ldy, const float* bias, const float* next) {
  int64_t m = 0;
  for (; m + kRowBlock <= rows; m += kRowBlock, next = nullptr)
    block<kRowBlock>(x + m * ldx, ldx, panel, K, y + m * ldy, ldy, bias, next);
  switch (rows - m) {
    case 5: block<5>(x + m * ldx, ldx, panel, K, y + m * ldy, ldy, bias, next); break;
    case 4: block<4>(x + m * ldx, ldx, panel, K, y + m * ldy, ldy, bias, next); break;
    case 3: block<3>(x + m * ldx, ldx, panel, K, y + m * ldy, ldy, bias, next); break;
    case 2: block<2>(x + m * ldx, ldx, panel, K, y + m * ldy, ldy, bias, next); break;
    case 1: block<1>(x + m * ldx, ldx, panel, K, y + m * ldy, ldy, bias, next); break;
    default: break;
  }
}

at::Tensor pack_panels(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 2,
              "pack_panels: weight must be a float32 CPU [out, in] matrix");
  TORCH_CHECK(weight.size(0) % kPanel == 0, "pack_panels: out_features (", weight.size(0),
              ") must be a multiple of ", kPanel);
  const int64_t N = weight.size(0), K = weight.size(1);
  return weight.reshape({N / kPanel, kPanel, K}).transpose(1, 2).contiguous();
}

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels,
                        const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 &&
                  x.stride(1) == 1,
              "panel_linear: x must be a float32 CPU [rows, in] with dense rows");
  TORCH_CHECK(panels.scalar_type() == at::kFloat && panels.dim() == 3 && panels.is_contiguous() &&
                  panels.size(2) == kPanel,
              "panel_linear: panels must come from pack_panels");
  TORCH_CHECK(panels.size(1) == x.size(1), "panel_linear: x has ", x.size(1),
              " features, the weight ", panels.size(1));
  const int64_t rows = x.size(0), K = x.size(1), num_panels = panels.size(0);
  const int64_t N = num_panels * kPanel, ldx = x.stride(0);
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "panel_linear: bias must be a float32 [out]");
    bp = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({rows, N}, x.options());
  if (rows == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* pp = panels.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Each thread takes a contiguous range of panels and walks it once per chunk of rows.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(1, (num_panels + threads - 1) / threads);
  at::parallel_for(0, num_panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < rows; m += kRowChunk) {
      const int64_t chunk = std::min(kRowChunk, rows - m);
      for (int64_t p = begin; p < end; ++p) {
        const float* next = p + 1 < end ? pp + (p + 1) * K * kPanel : nullptr;
        rows_by_panel(xp + m * ldx, chunk, ldx, pp + p * K * kPanel, K, yp + m * N + p * kPanel,
                      N, bp ? bp + p * kPanel : nullptr, next);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmserve, m) {
  m.def("pack_panels(Tensor weight) -> Tensor");
  m.def("panel_linear(Tensor x, Tensor panels, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmserve, CPU, m) {
  m.impl("pack_panels", pack_panels);
  m.impl("panel_linear", panel_linear);
}
