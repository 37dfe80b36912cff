// Scalar helpers shared by the CPU kernels, written so that `omp simd` loops over them
// vectorize (AVX-512, AVX2, NEON: whatever the build machine has).
#pragma once

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace mmserve {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Rounds like a store to T and a load back: identity for fp32, round-to-nearest-even for bf16.
inline float round_as(float x, float) { return x; }
inline float round_as(float x, c10::BFloat16) { return to_float(c10::BFloat16(x)); }

template <typename T>
inline void store(T* dst, float x) { *dst = static_cast<T>(x); }

// exp(x) for x <= 0: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, p of degree 6 (relative
// error below 2e-7); inputs under -87 give 0.
#pragma omp declare simd
inline float exp_nonpositive(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;
  const float n = std::nearbyint(clamped * 1.44269504088896341f);
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
  const float sigmoid = x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
  return x * sigmoid;
}

}  // namespace mmserve
