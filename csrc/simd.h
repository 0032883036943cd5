// The vector lanes csrc's CPU kernels are written in: 8 float32 lanes with AVX2, FMA and F16C (also what AVX-512
// machines run here; kernels.py builds with -march=native), else plain C++ on one lane.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LCDFAST_AVX2 1
#endif

namespace lcdfast::simd {

#if defined(LCDFAST_AVX2)
using vec = __m256;
constexpr int kLanes = 8;
inline vec splat(float a) { return _mm256_set1_ps(a); }
inline vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline bool any_nan(vec a) { return _mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)) != 0; }
inline float hsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float hmax(vec a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline vec load(const float* p) { return _mm256_loadu_ps(p); }
inline vec load(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128((const __m128i*)p);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline vec load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline void store(float* p, vec a) { _mm256_storeu_ps(p, a); }
#else
using vec = float;
constexpr int kLanes = 1;
inline vec splat(float a) { return a; }
inline vec fma(vec a, vec b, vec c) { return a * b + c; }
inline vec vmax(vec a, vec b) { return a > b ? a : b; }
inline bool any_nan(vec a) { return std::isnan(a); }
inline float hsum(vec a) { return a; }
inline float hmax(vec a) { return a; }
template <typename T>
inline vec load(const T* p) { return static_cast<float>(*p); }
inline void store(float* p, vec a) { *p = a; }
#endif

}  // namespace lcdfast::simd
