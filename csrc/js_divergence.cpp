// DoLa's layer selection (DESIGN.md §3, §4.4): the Jensen-Shannon divergence of each candidate layer's next-token
// distribution from the final layer's.
//
//   js_divergence(final [B, V], layers [L, B, V]) -> [L, B], all float32
//   js[l, b] = mean_v [ m log m - m (log p + log q) / 2 ],  m = (p + q) / 2,
//   p = softmax(final[b]), q = softmax(layers[l, b])
//
// The torch reference (contrast.js_divergence) compiles to some thirty passes over the logits, each its own
// parallel region, and its exp and log (Sleef's, to 1 ulp) take most of the time: 1.4 ms of a DoLa step at batch 1.
// Here two passes over vocabulary chunks: each row's max, exponentials (kept) and their sum per chunk, merged into
// the row's normalizer; then the terms, one log each, summed per chunk and the chunks added in order (the result
// doesn't depend on the thread count). exp and log are short polynomials good to a few 1e-8 relative (AVX2 where
// the CPU has it, see simd.h; else libm), enough for an argmax over layers.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "simd.h"

namespace {

using namespace lcdfast::simd;

#if defined(LCDFAST_AVX2)
// e^y for y <= 0 (not NaN), 0 below -87.3: y = n ln 2 + r, |r| <= ln 2 / 2, e^r = 1 + r + r^2/2 + r^3 h(r) with h a
// cubic fitted at Chebyshev nodes (2e-8 relative), 2^n put into the exponent bits.
inline vec exp_nonpositive(vec y) {
  const vec small = _mm256_cmp_ps(y, splat(-87.3f), _CMP_LT_OQ);
  y = vmax(y, splat(-87.3f));
  const vec n = _mm256_round_ps(_mm256_mul_ps(y, splat(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vec r = fma(n, splat(-0.693359375f), fma(n, splat(2.12194440e-4f), y));  // y - n ln 2, ln 2 in two parts
  vec h = fma(splat(1.39261747e-3f), r, splat(8.35734699e-3f));
  h = fma(h, r, splat(4.16665561e-2f));
  h = fma(h, r, splat(1.66666299e-1f));
  const vec r2 = _mm256_mul_ps(r, r);
  const vec er = _mm256_add_ps(_mm256_add_ps(splat(1.f), r), fma(_mm256_mul_ps(r2, r), h, _mm256_mul_ps(r2, splat(0.5f))));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(small, _mm256_mul_ps(er, _mm256_castsi256_ps(two_n)));
}

// m log m for 0 <= m (not NaN), 0 below FLT_MIN: m = 2^k (1 + f), sqrt(1/2) <= 1 + f < sqrt(2),
// log(1 + f) = f - f^2/2 + f^3 g(f) with g of degree 7 fitted at Chebyshev nodes (2e-8 relative).
inline vec xlogx(vec m) {
  const vec tiny = _mm256_cmp_ps(m, splat(FLT_MIN), _CMP_LT_OQ);
  const __m256i bits = _mm256_castps_si256(vmax(m, splat(FLT_MIN)));
  // mantissa in [1, 2) shifted to [sqrt(1/2), sqrt(2)) by borrowing from the exponent: offset by sqrt(1/2)'s bits
  const __m256i offset = _mm256_sub_epi32(bits, _mm256_set1_epi32(0x3f3504f3));
  const __m256i k = _mm256_srai_epi32(offset, 23);
  const vec x = _mm256_castsi256_ps(_mm256_sub_epi32(bits, _mm256_slli_epi32(k, 23)));
  const vec f = _mm256_sub_ps(x, splat(1.f));
  vec g = fma(splat(-8.10227022e-2f), f, splat(1.27126783e-1f));
  g = fma(g, f, splat(-1.29721448e-1f));
  g = fma(g, f, splat(1.42021149e-1f));
  g = fma(g, f, splat(-1.66422501e-1f));
  g = fma(g, f, splat(2.00014710e-1f));
  g = fma(g, f, splat(-2.50002950e-1f));
  g = fma(g, f, splat(3.33333284e-1f));
  const vec f2 = _mm256_mul_ps(f, f);
  const vec log1pf = fma(_mm256_mul_ps(f2, f), g, fma(f2, splat(-0.5f), f));
  const vec log_m = fma(_mm256_cvtepi32_ps(k), splat(0.693147181f), log1pf);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(m, log_m));
}
#else
inline vec exp_nonpositive(vec y) { return std::exp(y); }
inline vec xlogx(vec m) { return m < FLT_MIN ? 0.f : m * std::log(m); }
#endif

constexpr int64_t kChunk = 2048;  // vocabulary entries per work item: 8 KB of a row, in L1 across its sub-passes

struct ChunkStats {
  float max, sum;  // sum of exp(x - max)
  bool nan;
};

// One chunk of one row: its max, e = exp(x - max) into `exps`, and their sum. n is a multiple of kLanes but in the
// vocabulary's last chunk, whose tail is done one lane at a time with libm.
ChunkStats chunk_exps(const float* x, float* exps, int64_t n) {
  const int64_t body = n - n % kLanes;
  vec top = splat(-INFINITY);
  bool nan = false;
  for (int64_t i = 0; i < body; i += kLanes) {
    const vec xv = load(x + i);
    nan |= any_nan(xv);
    top = vmax(top, xv);
  }
  float max = hmax(top);
  for (int64_t i = body; i < n; ++i) nan |= std::isnan(x[i]), max = std::max(max, x[i]);
  if (nan || max == -INFINITY || max == INFINITY) {  // no exponentials to keep: zeros, for pass 2's reads
    std::fill(exps, exps + n, 0.f);
    return {max, 0.f, nan || max == INFINITY};
  }
  const vec shift = splat(-max);
  vec sum = splat(0.f);
  for (int64_t i = 0; i < body; i += kLanes) {
    const vec e = exp_nonpositive(load(x + i) + shift);
    store(exps + i, e);
    sum = sum + e;
  }
  float total = hsum(sum);
  for (int64_t i = body; i < n; ++i) total += exps[i] = std::exp(x[i] - max);
  return {max, total, false};
}

// Sum over a chunk of m log m - m (log p + log q) / 2 with p = ep * p_scale, log p = xp - p_lse (and q alike).
double chunk_terms(const float* xp, const float* ep, float p_scale, float p_lse, const float* xq, const float* eq,
                  float q_scale, float q_lse, int64_t n) {
  const int64_t body = n - n % kLanes;
  const vec half = splat(0.5f), ps = splat(p_scale), qs = splat(q_scale), p_shift = splat(-p_lse),
            q_shift = splat(-q_lse);
  vec acc = splat(0.f);
  for (int64_t i = 0; i < body; i += kLanes) {
    const vec m = half * fma(load(ep + i), ps, load(eq + i) * qs);
    const vec log_pq = (load(xp + i) + p_shift) + (load(xq + i) + q_shift);  // log p + log q
    acc = acc + (xlogx(m) - half * m * log_pq);
  }
  double sum = hsum(acc);
  for (int64_t i = body; i < n; ++i) {
    const float m = 0.5f * (ep[i] * p_scale + eq[i] * q_scale);
    sum += (m < FLT_MIN ? 0.f : m * std::log(m)) - 0.5f * m * ((xp[i] - p_lse) + (xq[i] - q_lse));
  }
  return sum;
}

at::Tensor js_divergence_cpu(const at::Tensor& final_logits, const at::Tensor& layer_logits) {
  TORCH_CHECK(final_logits.dim() == 2 && layer_logits.dim() == 3, "js_divergence: final must be [B, V] and layers ",
              "[L, B, V], got ", final_logits.sizes(), " and ", layer_logits.sizes());
  TORCH_CHECK(layer_logits.size(1) == final_logits.size(0) && layer_logits.size(2) == final_logits.size(1),
              "js_divergence: layers ", layer_logits.sizes(), " don't match final ", final_logits.sizes());
  TORCH_CHECK(final_logits.scalar_type() == at::kFloat && layer_logits.scalar_type() == at::kFloat,
              "js_divergence: float32 logits only, got ", final_logits.scalar_type(), " and ",
              layer_logits.scalar_type());
  const at::Tensor final_c = final_logits.contiguous(), layers_c = layer_logits.contiguous();
  const int64_t L = layers_c.size(0), B = layers_c.size(1), V = layers_c.size(2);
  at::Tensor out = at::empty({L, B}, final_c.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(V > 0, "js_divergence: empty vocabulary");
  const int64_t rows = (L + 1) * B, chunks = (V + kChunk - 1) / kChunk;
  const float* final_p = final_c.const_data_ptr<float>();
  const float* layers_p = layers_c.const_data_ptr<float>();
  auto logits = [&](int64_t r) { return r < B ? final_p + r * V : layers_p + (r - B) * V; };  // final rows first
  at::Tensor exps_t = at::empty({rows, V}, final_c.options());
  float* exps = exps_t.data_ptr<float>();

  // Pass 1: per row and chunk, the exponentials and their sum; merged into each row's log-normalizer, and each
  // chunk's factor from its own max to the row's softmax.
  std::vector<ChunkStats> stats(rows * chunks);
  at::parallel_for(0, rows * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / chunks, v0 = item % chunks * kChunk;
      stats[item] = chunk_exps(logits(r) + v0, exps + r * V + v0, std::min(kChunk, V - v0));
    }
  });
  std::vector<float> lse(rows), scale(rows * chunks);
  for (int64_t r = 0; r < rows; ++r) {
    const ChunkStats* s = &stats[r * chunks];
    float max = -INFINITY, sum = 0.f;
    bool nan = false;
    for (int64_t c = 0; c < chunks; ++c) nan |= s[c].nan, max = std::max(max, s[c].max);
    for (int64_t c = 0; c < chunks; ++c) sum += s[c].sum * std::exp(s[c].max - max);  // 0 for all -inf chunks
    lse[r] = nan ? NAN : max + std::log(sum);  // NaN or +inf logits: the row's divergences are NaN, as in torch
    for (int64_t c = 0; c < chunks; ++c) scale[r * chunks + c] = nan ? NAN : std::exp(s[c].max - lse[r]);
  }

  // Pass 2: the terms per chunk, layer and row.
  std::vector<double> partial(chunks * L * B);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t v0 = c * kChunk, n = std::min(kChunk, V - v0);
      for (int64_t l = 0; l < L; ++l)
        for (int64_t b = 0; b < B; ++b) {
          const int64_t p = b, q = B + l * B + b;  // rows
          partial[(c * L + l) * B + b] =
              chunk_terms(logits(p) + v0, exps + p * V + v0, scale[p * chunks + c], lse[p], logits(q) + v0,
                          exps + q * V + v0, scale[q * chunks + c], lse[q], n);
        }
    }
  });
  float* js = out.data_ptr<float>();
  for (int64_t lb = 0; lb < L * B; ++lb) {
    double sum = 0;
    for (int64_t c = 0; c < chunks; ++c) sum += partial[c * L * B + lb];
    js[lb] = static_cast<float>(sum / static_cast<double>(V));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lcdfast, m) {
  m.def("js_divergence(Tensor final_logits, Tensor layer_logits) -> Tensor");
}

TORCH_LIBRARY_IMPL(lcdfast, CPU, m) {
  m.impl("js_divergence", &js_divergence_cpu);
}
