// Decode attention that reads K/V in place from the paged cache (CPU).
//
// One query row per entry: each row attends to its first context_lens[s] cached tokens,
// found through its row of block_tables (a decode, or one row of a prompt whose own K/V are
// already cached; the model runner sends both). A task is one KV head of one row: the
// query heads sharing it score the same key rows one after the other (the first brings them
// into cache), then (bf16) read each value row once for up to four heads. AVX-512 where the build
// machine has it (bf16 keys scored with AVX-512 BF16 dot products where it has those), else
// `omp simd` loops the compiler vectorizes (AVX2, NEON); fp32 and bf16, accumulation in fp32.
//
// Registered as torch.ops.mmserve.paged_decode.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu_math.h"

#include <cmath>
#include <cstdint>
#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using mmserve::exp_nonpositive;
using mmserve::store;
using mmserve::to_float;

#if defined(__AVX512F__)
using mmserve::load16;

// q . k for a head dim of V * 16, q held in registers: the lane-wise products, unreduced.
template <typename T, int V>
inline __m512 dot_lanes(const __m512 (&q)[V], const T* k) {
  __m512 a = _mm512_mul_ps(q[0], load16(k));
  __m512 b = V > 1 ? _mm512_mul_ps(q[1], load16(k + 16)) : _mm512_setzero_ps();
  for (int i = 2; i < V; i += 2) {
    a = _mm512_fmadd_ps(q[i], load16(k + 16 * i), a);
    if (i + 1 < V) b = _mm512_fmadd_ps(q[i + 1], load16(k + 16 * (i + 1)), b);
  }
  return _mm512_add_ps(a, b);
}

// The lane sums of 16 vectors, as one vector: out[i] = sum(v[i]). 45 shuffles and adds
// instead of 16 separate reductions of about 8 each.
inline __m512 sum16(__m512 (&v)[16]) {
  __m512 w[8], x[4];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sum of 4 vectors
    const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
    x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(y01, y23, _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

#if defined(__AVX512BF16__)
constexpr int64_t kPrefetchRows = 8;  // key rows ahead of the one being scored

// Scores of one bf16 query head over the context with bf16 dot-product instructions
// (vdpbf16ps: 32 products per instruction, summed in fp32): the head's unscaled bf16 row
// against the cached keys, then `scale`. Returns their maximum.
// With `values` (the first head of a KV head), the key rows a few ahead and the value rows
// of the same slots are prefetched as it goes: the hardware prefetcher alone left the bf16
// kernel at ~18 GB/s, short of the memory's ~28 (SmolLM2, 185-token contexts, per layer: 16
// sequences 127 -> 93-99 us, 64 sequences 472 -> 372-403); the other heads of the group find
// the keys in cache.
template <int D>
float head_scores_bf16(const c10::BFloat16* q, float scale, const c10::BFloat16* k_cache,
                       const int32_t* table, int64_t context_len, int64_t block_size,
                       int64_t block_stride, float* scores, const c10::BFloat16* values) {
  static_assert(D % 32 == 0, "32 bf16 values per vector");
  constexpr int W = D / 32;
  __m512bh qv[W];
  for (int i = 0; i < W; ++i) qv[i] = (__m512bh)_mm512_loadu_si512(q + 32 * i);
  auto dot = [&](const c10::BFloat16* k) {
    __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], (__m512bh)_mm512_loadu_si512(k));
    for (int i = 1; i < W; ++i) a = _mm512_dpbf16_ps(a, qv[i], (__m512bh)_mm512_loadu_si512(k + 32 * i));
    return a;
  };
  const int64_t num_blocks = (context_len + block_size - 1) / block_size;
  const __m512 sc = _mm512_set1_ps(scale);
  const c10::BFloat16* rows[16];
  __m512 lanes[16];
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t t = 0, filled = 0;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const c10::BFloat16* k = k_cache + static_cast<int64_t>(table[b]) * block_stride;
    const int64_t end = std::min(block_size, context_len - b * block_size);
    const c10::BFloat16* v =
        values ? values + static_cast<int64_t>(table[b]) * block_stride : nullptr;
    for (int64_t o = 0; o < end; ++o, k += D) {
      if (v) {  // one cache line (32 values) at a time; past the block's end it is harmless
        for (int l = 0; l < D; l += 32) {
          _mm_prefetch(reinterpret_cast<const char*>(k + kPrefetchRows * D + l), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(v + o * D + l), _MM_HINT_T0);
        }
      }
      rows[filled++] = k;
      if (filled == 16) {
        for (int i = 0; i < 16; ++i) lanes[i] = dot(rows[i]);
        const __m512 sums = _mm512_mul_ps(sum16(lanes), sc);
        _mm512_storeu_ps(scores + t, sums);
        best = _mm512_max_ps(best, sums);
        t += 16;
        filled = 0;
      }
    }
  }
  float top = _mm512_reduce_max_ps(best);
  for (int i = 0; i < filled; ++i, ++t) {
    const float x = _mm512_reduce_add_ps(dot(rows[i])) * scale;
    scores[t] = x;
    top = x > top ? x : top;
  }
  return top;
}
#endif

// Scores of one query head over the context, into `scores`; returns their maximum.
template <typename T, int D>
float head_scores(const float* qf, const T* k_cache, const int32_t* table, int64_t context_len,
                  int64_t block_size, int64_t block_stride, int64_t head_dim, float* scores) {
  float top = -std::numeric_limits<float>::infinity();
  const int64_t num_blocks = (context_len + block_size - 1) / block_size;
#if defined(__AVX512F__)
  if constexpr (D > 0 && D % 16 == 0) {
    constexpr int V = D / 16;
    __m512 q[V];
    for (int i = 0; i < V; ++i) q[i] = _mm512_loadu_ps(qf + 16 * i);
    // 16 tokens at a time, wherever their blocks are; the rest one by one.
    const T* rows[16];
    __m512 lanes[16];
    __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t t = 0, filled = 0;
    for (int64_t b = 0; b < num_blocks; ++b) {
      const T* k = k_cache + static_cast<int64_t>(table[b]) * block_stride;
      const int64_t end = std::min(block_size, context_len - b * block_size);
      for (int64_t o = 0; o < end; ++o, k += D) {
        rows[filled++] = k;
        if (filled == 16) {
          for (int i = 0; i < 16; ++i) lanes[i] = dot_lanes<T, V>(q, rows[i]);
          const __m512 sums = sum16(lanes);
          _mm512_storeu_ps(scores + t, sums);
          best = _mm512_max_ps(best, sums);
          t += 16;
          filled = 0;
        }
      }
    }
    top = _mm512_reduce_max_ps(best);
    for (int i = 0; i < filled; ++i, ++t) {
      const float dot = _mm512_reduce_add_ps(dot_lanes<T, V>(q, rows[i]));
      scores[t] = dot;
      top = dot > top ? dot : top;
    }
    return top;
  }
#endif
  for (int64_t b = 0, t = 0; b < num_blocks; ++b) {
    const T* k = k_cache + static_cast<int64_t>(table[b]) * block_stride;
    const int64_t end = std::min(block_size, context_len - b * block_size);
    for (int64_t o = 0; o < end; ++o, ++t, k += head_dim) {
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < head_dim; ++d) dot += qf[d] * to_float(k[d]);
      scores[t] = dot;
      top = dot > top ? dot : top;
    }
  }
  return top;
}

// sum_t p[t] * v[t] over the context, scaled by `inv`, into `out`.
template <typename T, int D>
void head_values(const float* p, const T* v_cache, const int32_t* table, int64_t context_len,
                 int64_t block_size, int64_t block_stride, int64_t head_dim, float inv, T* out,
                 float* acc) {
  const int64_t num_blocks = (context_len + block_size - 1) / block_size;
#if defined(__AVX512F__)
  if constexpr (D > 0 && D % 16 == 0) {
    constexpr int V = D / 16;
    // Two sets of accumulators, alternating tokens: twice the FMA chains in flight.
    __m512 a[V], b[V];
    for (int i = 0; i < V; ++i) a[i] = b[i] = _mm512_setzero_ps();
    int64_t t = 0;
    for (int64_t blk = 0; blk < num_blocks; ++blk) {
      const T* v = v_cache + static_cast<int64_t>(table[blk]) * block_stride;
      const int64_t end = std::min(block_size, context_len - blk * block_size);
      int64_t o = 0;
      for (; o + 1 < end; o += 2, t += 2, v += 2 * D) {
        const __m512 p0 = _mm512_set1_ps(p[t]), p1 = _mm512_set1_ps(p[t + 1]);
        for (int i = 0; i < V; ++i) {
          a[i] = _mm512_fmadd_ps(p0, load16(v + 16 * i), a[i]);
          b[i] = _mm512_fmadd_ps(p1, load16(v + D + 16 * i), b[i]);
        }
      }
      if (o < end) {
        const __m512 p0 = _mm512_set1_ps(p[t]);
        for (int i = 0; i < V; ++i) a[i] = _mm512_fmadd_ps(p0, load16(v + 16 * i), a[i]);
        ++t;
      }
    }
    const __m512 scale = _mm512_set1_ps(inv);
    for (int i = 0; i < V; ++i) _mm512_storeu_ps(acc + 16 * i, _mm512_mul_ps(_mm512_add_ps(a[i], b[i]), scale));
    for (int64_t d = 0; d < D; ++d) store(out + d, acc[d]);
    return;
  }
#endif
  std::fill(acc, acc + head_dim, 0.0f);
  for (int64_t b = 0, t = 0; b < num_blocks; ++b) {
    const T* v = v_cache + static_cast<int64_t>(table[b]) * block_stride;
    const int64_t end = std::min(block_size, context_len - b * block_size);
    for (int64_t o = 0; o < end; ++o, ++t, v += head_dim) {
      const float pt = p[t];
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) acc[d] += pt * to_float(v[d]);
    }
  }
#pragma omp simd
  for (int64_t d = 0; d < head_dim; ++d) store(out + d, acc[d] * inv);
}

#if defined(__AVX512F__)
// sum_t p_g[t] * v[t] for G query heads at once (p_g = p + g * p_stride), each scaled by
// inv[g], into out + g * D: every cached value row is loaded and widened once for all G.
template <typename T, int D, int G>
void group_values(const float* p, int64_t p_stride, const T* v_cache, const int32_t* table,
                  int64_t context_len, int64_t block_size, int64_t block_stride, const float* inv,
                  T* out, float* acc_out) {
  constexpr int V = D / 16;
  __m512 acc[G][V];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < V; ++i) acc[g][i] = _mm512_setzero_ps();
  const int64_t num_blocks = (context_len + block_size - 1) / block_size;
  for (int64_t blk = 0, t = 0; blk < num_blocks; ++blk) {
    const T* v = v_cache + static_cast<int64_t>(table[blk]) * block_stride;
    const int64_t end = std::min(block_size, context_len - blk * block_size);
    for (int64_t o = 0; o < end; ++o, ++t, v += D) {
      __m512 row[V];
      for (int i = 0; i < V; ++i) row[i] = load16(v + 16 * i);
      for (int g = 0; g < G; ++g) {
        const __m512 pg = _mm512_set1_ps(p[g * p_stride + t]);
        for (int i = 0; i < V; ++i) acc[g][i] = _mm512_fmadd_ps(pg, row[i], acc[g][i]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m512 scale = _mm512_set1_ps(inv[g]);
    for (int i = 0; i < V; ++i) _mm512_storeu_ps(acc_out + 16 * i, _mm512_mul_ps(acc[g][i], scale));
    for (int64_t d = 0; d < D; ++d) store(out + g * D + d, acc_out[d]);
  }
}
#endif

// One KV head of one sequence: its `group` query heads against its context_len cached keys.
// D is the head dim when known at compile time (0: runtime head_dim).
template <typename T, int D>
void decode_kv_head(const T* q, int64_t q_head_stride,  // the first query head of this KV head
                    const T* k_cache, const T* v_cache, const int32_t* table,
                    int64_t context_len, int64_t block_size, int64_t block_stride, int64_t group,
                    int64_t runtime_head_dim, float scale, T* out, std::vector<float>& scratch) {
  const int64_t head_dim = D ? D : runtime_head_dim;
#if defined(__AVX512F__)
  // bf16 only: there every value row is widened to fp32, once per row instead of once per
  // head; fp32 rows gain nothing from it (measured no faster).
  if constexpr (D > 0 && D % 16 == 0 && std::is_same_v<T, c10::BFloat16>) {
    // Every head's probabilities first, then one pass over the values for up to 4 heads.
    scratch.resize(D + group * (context_len + 1));
    float* acc = scratch.data();
    float* inv = acc + D;
    float* probs = inv + group;
    for (int64_t g = 0; g < group; ++g) {
      const T* qg = q + g * q_head_stride;
      float* scores = probs + g * context_len;
      float top;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, c10::BFloat16> && D % 32 == 0) {
        top = head_scores_bf16<D>(qg, scale, k_cache, table, context_len, block_size, block_stride,
                                  scores, g == 0 ? v_cache : nullptr);
      } else
#endif
      {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] = to_float(qg[d]) * scale;
        top = head_scores<T, D>(acc, k_cache, table, context_len, block_size, block_stride, D,
                                scores);
      }
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < context_len; ++t) {
        scores[t] = exp_nonpositive(scores[t] - top);
        sum += scores[t];
      }
      inv[g] = 1.0f / sum;
    }
    for (int64_t g = 0; g < group;) {
      const int64_t n = std::min<int64_t>(group - g, 4);
      const float* pg = probs + g * context_len;
      T* og = out + g * D;
      switch (n) {
        case 4: group_values<T, D, 4>(pg, context_len, v_cache, table, context_len, block_size, block_stride, inv + g, og, acc); break;
        case 3: group_values<T, D, 3>(pg, context_len, v_cache, table, context_len, block_size, block_stride, inv + g, og, acc); break;
        case 2: group_values<T, D, 2>(pg, context_len, v_cache, table, context_len, block_size, block_stride, inv + g, og, acc); break;
        default: group_values<T, D, 1>(pg, context_len, v_cache, table, context_len, block_size, block_stride, inv + g, og, acc); break;
      }
      g += n;
    }
    return;
  }
#endif
  scratch.resize(head_dim * 2 + context_len);
  float* qf = scratch.data();      // one query head, pre-scaled
  float* acc = qf + head_dim;      // its output before rounding to T
  float* scores = acc + head_dim;  // its probabilities over the context
  for (int64_t g = 0; g < group; ++g) {
    const T* qg = q + g * q_head_stride;
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) qf[d] = to_float(qg[d]) * scale;
    const float top = head_scores<T, D>(qf, k_cache, table, context_len, block_size, block_stride,
                                        head_dim, scores);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < context_len; ++t) {
      scores[t] = exp_nonpositive(scores[t] - top);
      sum += scores[t];
    }
    head_values<T, D>(scores, v_cache, table, context_len, block_size, block_stride, head_dim,
                      1.0f / sum, out + g * head_dim, acc);
  }
}

template <typename T>
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
            at::Tensor& out) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, width = block_tables.size(1);
  const int64_t q_row_stride = q.stride(0), q_head_stride = q.stride(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  // A block is [kv_heads, block_size, head_dim]: one KV head's rows in a block are one run
  // of block_size * head_dim values, which the hardware prefetcher streams.
  const int64_t head_stride = block_size * head_dim, block_stride = num_kv_heads * head_stride;
  auto kv_head = head_dim == 64    ? decode_kv_head<T, 64>
                 : head_dim == 128 ? decode_kv_head<T, 128>
                 : head_dim == 96  ? decode_kv_head<T, 96>
                 : head_dim == 80  ? decode_kv_head<T, 80>
                                   : decode_kv_head<T, 0>;
  // Tasks go to whichever thread is free: a thread that another process preempts holds back
  // one task, not half the step.
  mmserve::for_each_task(num_seqs * num_kv_heads, [&](int64_t item) {
    thread_local std::vector<float> scratch;
    const int64_t s = item / num_kv_heads, h = item % num_kv_heads;
    kv_head(qp + s * q_row_stride + h * group * q_head_stride, q_head_stride,
            kp + h * head_stride, vp + h * head_stride, tables + s * width, lens[s], block_size,
            block_stride, group, head_dim, static_cast<float>(scale),
            op + (s * num_heads + h * group) * head_dim, scratch);
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
              "k_cache and v_cache must be contiguous [blocks, kv_heads, block_size, head_dim]");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(k_cache.size(3) == q.size(2), "head_dim of q and the cache differ");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block_tables and context_lens must be int32");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.is_contiguous() &&
                  block_tables.size(0) == q.size(0),
              "block_tables must be a contiguous [seqs, max_blocks]");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.is_contiguous() &&
                  context_lens.size(0) == q.size(0),
              "context_lens must be a contiguous [seqs]");
  // Every block a sequence reads must exist: a bad table is an error, not a stray read.
  const int64_t block_size = k_cache.size(2), num_blocks = k_cache.size(0);
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
