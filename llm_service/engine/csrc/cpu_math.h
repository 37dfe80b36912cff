// Scalar helpers shared by the CPU kernels, written so that `omp simd` loops over them
// vectorize (AVX-512, AVX2, NEON: whatever the build machine has): no calls, and selects
// instead of branches (the build passes -fno-trapping-math, without which gcc keeps even a
// clamp as a branch and leaves the loop scalar); and the dynamic task loop the kernels share.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace mmserve {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

#if defined(__AVX512F__)
// 16 values as fp32 lanes: a load, or (bf16) a load widened by a 16-bit shift.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

// fp32 -> bf16 bits, rounded to nearest even, without branches (so loops over it vectorize);
// infinities stay infinite and a NaN becomes the quiet NaN, as in c10::BFloat16's conversion.
inline uint16_t bf16_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(x != x ? 0x7fc0u : rounded);  // NaN: the canonical quiet one
}

// Rounds like a store to T and a load back: identity for fp32, round-to-nearest-even for bf16.
inline float round_as(float x, float) { return x; }
inline c10::BFloat16 to_bf16(float x) {
  return c10::BFloat16(bf16_bits(x), c10::BFloat16::from_bits());
}
inline float round_as(float x, c10::BFloat16) { return to_float(to_bf16(x)); }

template <typename T>
inline void store(T* dst, float x) { *dst = static_cast<T>(x); }
inline void store(c10::BFloat16* dst, float x) { *dst = to_bf16(x); }

// exp(x) for x <= 0: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, p of degree 6 (relative
// error below 2e-7); inputs under -87 give 0.
#pragma omp declare simd
inline float exp_nonpositive(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;
  // floor, not nearbyint: nearbyint is a call that keeps the loop scalar.
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  const float r = clamped - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x <= -87.0f ? 0.0f : p * scale;
}

// x * sigmoid(x), as x / (1 + exp(-x)) without overflow for any x.
#pragma omp declare simd
inline float silu(float x) {
  const float e = exp_nonpositive(-std::fabs(x));
  const float numerator = x >= 0.0f ? 1.0f : e;  // a select, not a branch: loops vectorize
  return x * (numerator / (1.0f + e));
}

// How many of torch's threads for_each_task runs `tasks` on.
inline int64_t task_threads(int64_t tasks) {
  return std::min<int64_t>(at::get_num_threads(), tasks);
}

// Runs fn(0 .. tasks - 1) on task_threads(tasks) threads, one task at a time to whichever
// is free, in order.
template <typename Fn>
void for_each_task(int64_t tasks, const Fn& fn) {
#if defined(_OPENMP)
  const int threads = static_cast<int>(task_threads(tasks));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t task = 0; task < tasks; ++task) fn(task);
#else
  for (int64_t task = 0; task < tasks; ++task) fn(task);
#endif
}

}  // namespace mmserve
