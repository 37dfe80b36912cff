// y = x @ W^T (+ bias) in fp32 or bf16: a register-blocked kernel over k-major weight panels.
//
// oneDNN's kernels lose much of the machine's FMA rate at the row counts of decode steps
// (AVX2, 16 rows: 85-95 GFLOP/s on 2 cores against 160-170 at 512 rows). This is the
// classic register-blocked kernel: W is packed once into panels of 16 output columns laid
// out k-major ([N / 16, K, 16]), and each step multiplies a block of rows of x by the
// panels with every accumulator in a register, so every weight load feeds all the block's
// rows and every x broadcast several FMAs:
//   AVX2:    6 rows x 1 panel (2 ymm per row), 12 accumulators of 16
//   AVX-512: 12 rows x 2 panels (1 zmm per row and panel), 24 accumulators of 32
//   AVX-512 BF16: the same blocks over bf16 weights and rows, with dot-product instructions
// Work is split into tasks of a few panels each, handed out dynamically: a thread that the
// OS preempts for a moment (another process of the stack answering a token) holds back only
// its current task, not a static half of the matmul that the other thread then waits for.
// Rows go in chunks that stay in L2 while a task walks its panels, so W is read from memory
// once per chunk.
//
// Registered as torch.ops.mmserve.pack_panels and torch.ops.mmserve.panel_linear.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_math.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kPanel = 16;       // output columns per panel
constexpr int64_t kRowBlock = 6;     // rows per register block
constexpr int64_t kChunkBytes = 256 * 1024;  // x rows per chunk: about this much of L2
// Panels per task handed to a thread. A task's first panel pair has no prefetch ahead of it
// (the pair before it prefetches the next one), so with 4 half the pairs came in cold: at
// 16 rows (30 layers' weights from memory, alternating runs) 8 took fp32 15.5-17.8 ms against
// 19.1-27.6 and bf16 6.9-8.8 against 9.2-12.4.
constexpr int64_t kTaskPanels = 8;

// Tasks go out in order, one at a time, so a thread that finishes task t most likely takes
// t + threads next (threads: mmserve::task_threads): the first panel of that task, for the
// last pair of t to prefetch, so that no task starts on panels straight from memory. (A
// wrong guess costs one task's first pair of extra reads, into a cache that then does not
// use them.)
template <typename T>
const T* likely_next_task(const T* panels, int64_t panel_size, int64_t task, int64_t threads,
                          int64_t num_panels) {
  const int64_t first = (task + threads) * kTaskPanels;
  return first < num_panels ? panels + first * panel_size : nullptr;
}

#if defined(__AVX512F__)
// The zmm kernel's per-dtype steps. fp32: 16 columns of one k per vector, one x value
// broadcast, FMA. bf16: W packed as [N / 16, K / 2, 16, 2], so a vector holds 16 columns of
// one k pair, and an x pair is broadcast as one 32-bit lane, so one vdpbf16ps does 32
// multiply-adds into 16 fp32 accumulators: twice fp32's rate, from half the bytes, rounded
// to bf16 once, at the store, as oneDNN does.
inline __m512 zmm_weights(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 zmm_broadcast(const float* x) { return _mm512_set1_ps(*x); }
inline __m512 zmm_madd(__m512 acc, __m512 x, __m512 w) { return _mm512_fmadd_ps(x, w, acc); }
inline void zmm_store(float* y, __m512 v) { _mm512_storeu_ps(y, v); }
#if defined(__AVX512BF16__)
inline __m512bh zmm_weights(const c10::BFloat16* w) {
  return (__m512bh)_mm512_loadu_si512(w);
}
inline __m512bh zmm_broadcast(const c10::BFloat16* x) {
  int32_t pair;
  std::memcpy(&pair, x, sizeof(pair));
  return (__m512bh)_mm512_set1_epi32(pair);
}
inline __m512 zmm_madd(__m512 acc, __m512bh x, __m512bh w) { return _mm512_dpbf16_ps(acc, x, w); }
inline void zmm_store(c10::BFloat16* y, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), (__m256i)_mm512_cvtneps_pbh(v));
}
#endif

// 12 rows x 2 panels: 24 zmm accumulators, 2 weight loads and 12 broadcasts per k step (one
// k in fp32, a k pair in bf16; `depth` of them). Two = false: one panel, 12 accumulators.
template <int MR, bool Two, typename T>
inline void block_zmm(const T* x, int64_t ldx, const T* panel, int64_t depth, T* y, int64_t ldy,
                      const T* bias, const T* next) {
  static_assert(MR >= 1 && MR <= 12, "up to 12 rows per block");
  constexpr int64_t kx = std::is_same_v<T, float> ? 1 : 2;  // x values per k step
  constexpr int64_t kw = kx * kPanel;                        // weight values per k step
  const T* second = panel + depth * kw;
  __m512 a0 = _mm512_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0,
         b3 = a0, a4 = a0, b4 = a0, a5 = a0, b5 = a0, a6 = a0, b6 = a0, a7 = a0, b7 = a0,
         a8 = a0, b8 = a0, a9 = a0, b9 = a0, a10 = a0, b10 = a0, a11 = a0, b11 = a0;
#define MMSERVE_ROW(i)                                      \
  if constexpr (MR > i) {                                   \
    const auto v = zmm_broadcast(x + i * ldx + kx * k);     \
    a##i = zmm_madd(a##i, v, w0);                           \
    if constexpr (Two) b##i = zmm_madd(b##i, v, w1);        \
  }
  for (int64_t k = 0; k < depth; ++k) {
    if (next) {
      _mm_prefetch(reinterpret_cast<const char*>(next + k * kw), _MM_HINT_T0);
      if constexpr (Two)
        _mm_prefetch(reinterpret_cast<const char*>(next + (depth + k) * kw), _MM_HINT_T0);
    }
    const auto w0 = zmm_weights(panel + k * kw);
    const auto w1 = Two ? zmm_weights(second + k * kw) : w0;
    MMSERVE_ROW(0) MMSERVE_ROW(1) MMSERVE_ROW(2) MMSERVE_ROW(3) MMSERVE_ROW(4) MMSERVE_ROW(5)
    MMSERVE_ROW(6) MMSERVE_ROW(7) MMSERVE_ROW(8) MMSERVE_ROW(9) MMSERVE_ROW(10) MMSERVE_ROW(11)
  }
#undef MMSERVE_ROW
  // The bias (bf16: widened to fp32) joins the sum before its one rounding.
  const __m512 c0 = bias ? mmserve::load16(bias) : _mm512_setzero_ps();
  const __m512 c1 = bias && Two ? mmserve::load16(bias + kPanel) : _mm512_setzero_ps();
#define MMSERVE_STORE(i)                                                        \
  if constexpr (MR > i) {                                                       \
    zmm_store(y + i * ldy, _mm512_add_ps(a##i, c0));                            \
    if constexpr (Two) zmm_store(y + i * ldy + kPanel, _mm512_add_ps(b##i, c1)); \
  }
  MMSERVE_STORE(0) MMSERVE_STORE(1) MMSERVE_STORE(2) MMSERVE_STORE(3) MMSERVE_STORE(4)
  MMSERVE_STORE(5) MMSERVE_STORE(6) MMSERVE_STORE(7) MMSERVE_STORE(8) MMSERVE_STORE(9)
  MMSERVE_STORE(10) MMSERVE_STORE(11)
#undef MMSERVE_STORE
}

#endif

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

#if defined(__AVX512F__)
// All rows of x against one panel (Two: and the one after it): blocks of 12 rows, then the
// rest; the first block also prefetches `next`. T picks the fp32 or the bf16 block kernel.
template <bool Two, typename T>
void rows_by_panels_zmm(const T* x, int64_t rows, int64_t ldx, const T* panel, int64_t depth,
                        T* y, int64_t ldy, const T* bias, const T* next) {
  int64_t m = 0;
  for (; m + 12 <= rows; m += 12, next = nullptr)
    block_zmm<12, Two>(x + m * ldx, ldx, panel, depth, y + m * ldy, ldy, bias, next);
  x += m * ldx;
  y += m * ldy;
  switch (rows - m) {
#define MMSERVE_TAIL(r) case r: block_zmm<r, Two>(x, ldx, panel, depth, y, ldy, bias, next); break;
    MMSERVE_TAIL(11) MMSERVE_TAIL(10) MMSERVE_TAIL(9) MMSERVE_TAIL(8) MMSERVE_TAIL(7)
    MMSERVE_TAIL(6) MMSERVE_TAIL(5) MMSERVE_TAIL(4) MMSERVE_TAIL(3) MMSERVE_TAIL(2)
    MMSERVE_TAIL(1)
#undef MMSERVE_TAIL
    default: break;
  }
}

// Every row of x against panels [begin, end), two at a time, in chunks of `row_chunk` rows.
// `depth`: the k steps of a panel (K in fp32, K / 2 pairs in bf16); `panel_size`: its values.
// Each pair prefetches the next; the last pair prefetches the task's own first pair when
// another chunk of rows follows, else `after` (the first pair of the task this thread will
// probably take next; nullptr: none).
template <typename T>
void panels_zmm(const T* x, int64_t rows, int64_t ldx, const T* panels, int64_t depth,
                int64_t panel_size, int64_t begin, int64_t end, int64_t row_chunk, T* y,
                int64_t N, const T* bias, const T* after) {
  for (int64_t m = 0; m < rows; m += row_chunk) {
    const int64_t chunk = std::min(row_chunk, rows - m);
    const T* last_next = m + row_chunk < rows ? panels + begin * panel_size : after;
    for (int64_t p = begin; p < end; p += 2) {
      const T* next = p + 2 < end ? panels + (p + 2) * panel_size : last_next;
      const T* panel = panels + p * panel_size;
      T* yo = y + m * N + p * kPanel;
      const T* bo = bias ? bias + p * kPanel : nullptr;
      if (p + 1 < end)
        rows_by_panels_zmm<true>(x + m * ldx, chunk, ldx, panel, depth, yo, N, bo, next);
      else
        rows_by_panels_zmm<false>(x + m * ldx, chunk, ldx, panel, depth, yo, N, bo, next);
    }
  }
}
#endif

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
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  TORCH_CHECK(weight.device().is_cpu() && (weight.scalar_type() == at::kFloat || bf16) &&
                  weight.dim() == 2,
              "pack_panels: weight must be a float32 or bfloat16 CPU [out, in] matrix");
  TORCH_CHECK(weight.size(0) % kPanel == 0, "pack_panels: out_features (", weight.size(0),
              ") must be a multiple of ", kPanel);
  const int64_t N = weight.size(0), K = weight.size(1);
  if (!bf16) return weight.reshape({N / kPanel, kPanel, K}).transpose(1, 2).contiguous();
#if defined(__AVX512BF16__)
  TORCH_CHECK(K % 2 == 0, "pack_panels: bfloat16 in_features (", K, ") must be even");
  // [N/16, 16, K/2, 2] -> [N/16, K/2, 16, 2], stored as [N/16, K/2, 32]
  return weight.reshape({N / kPanel, kPanel, K / 2, 2}).permute({0, 2, 1, 3}).contiguous()
      .reshape({N / kPanel, K / 2, 2 * kPanel});
#else
  TORCH_CHECK(false, "pack_panels: bfloat16 panels need a CPU with AVX-512 BF16");
#endif
}

#if defined(__AVX512BF16__)
at::Tensor panel_linear_bf16(const at::Tensor& x, const at::Tensor& panels,
                             const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(panels.scalar_type() == at::kBFloat16 && panels.dim() == 3 &&
                  panels.is_contiguous() && panels.size(2) == 2 * kPanel,
              "panel_linear: bfloat16 panels must come from pack_panels");
  TORCH_CHECK(2 * panels.size(1) == x.size(1), "panel_linear: x has ", x.size(1),
              " features, the weight ", 2 * panels.size(1));
  const int64_t rows = x.size(0), K = x.size(1), K2 = K / 2, num_panels = panels.size(0);
  const int64_t N = num_panels * kPanel, ldx = x.stride(0);
  const c10::BFloat16* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() &&
                    bias->numel() == N,
                "panel_linear: bias must be a bfloat16 [out]");
    bp = bias->data_ptr<c10::BFloat16>();
  }
  at::Tensor y = at::empty({rows, N}, x.options());
  if (rows == 0) return y;
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* pp = panels.data_ptr<c10::BFloat16>();
  auto* yp = y.data_ptr<c10::BFloat16>();
  const int64_t panel_size = K2 * 2 * kPanel;
  const int64_t num_tasks = (num_panels + kTaskPanels - 1) / kTaskPanels;
  const int64_t row_chunk = std::max<int64_t>(12, kChunkBytes / (K * 2) / 12 * 12);
  const int64_t threads = mmserve::task_threads(num_tasks);
  mmserve::for_each_task(num_tasks, [&](int64_t task) {
    const int64_t begin = task * kTaskPanels, end = std::min(num_panels, begin + kTaskPanels);
    panels_zmm(xp, rows, ldx, pp, K2, panel_size, begin, end, row_chunk, yp, N, bp,
               likely_next_task(pp, panel_size, task, threads, num_panels));
  });
  return y;
}
#endif

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels,
                        const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1,
              "panel_linear: x must be a CPU [rows, in] with dense rows");
  if (x.scalar_type() == at::kBFloat16) {
#if defined(__AVX512BF16__)
    return panel_linear_bf16(x, panels, bias);
#else
    TORCH_CHECK(false, "panel_linear: bfloat16 needs a CPU with AVX-512 BF16");
#endif
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat, "panel_linear: x must be float32 or bfloat16");
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
  // Tasks of kTaskPanels panels, handed out one at a time; a task walks its panels once per
  // chunk of rows.
  const int64_t num_tasks = (num_panels + kTaskPanels - 1) / kTaskPanels;
  const int64_t row_chunk = std::max<int64_t>(12, kChunkBytes / (K * 4) / 12 * 12);
  [[maybe_unused]] const int64_t threads = mmserve::task_threads(num_tasks);
  mmserve::for_each_task(num_tasks, [&](int64_t task) {
    const int64_t begin = task * kTaskPanels, end = std::min(num_panels, begin + kTaskPanels);
#if defined(__AVX512F__)
    panels_zmm(xp, rows, ldx, pp, K, K * kPanel, begin, end, row_chunk, yp, N, bp,
               likely_next_task(pp, K * kPanel, task, threads, num_panels));
#else
    for (int64_t m = 0; m < rows; m += row_chunk) {
      const int64_t chunk = std::min(row_chunk, rows - m);
      for (int64_t p = begin; p < end; ++p) {
        const float* next = p + 1 < end ? pp + (p + 1) * K * kPanel : nullptr;
        rows_by_panel(xp + m * ldx, chunk, ldx, pp + p * K * kPanel, K, yp + m * N + p * kPanel,
                      N, bp ? bp + p * kPanel : nullptr, next);
      }
    }
#endif
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
