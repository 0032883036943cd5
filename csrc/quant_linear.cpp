// Products with few rows from weight-only quantized weights (quant.py's layout), float activations:
//
//   quant_linear(x [M, K], q, scale [N, K/G], low [N, K/G] or None) -> [M, N] in x's dtype, summed in float32
//   q: int8 codes [N, K] (w = q * scale), or 4-bit codes packed uint8 [N, K/2] (w = q * scale + low), where in each
//   chunk of 32 columns byte j holds column j in its low nibble and column j + 16 in its high one (GGUF's Q4 order).
//
// Decoding reads every weight once per token, so the codes are what streams from memory: each chunk of 32 codes of a
// weight row is loaded once, widened to float32 and dequantized in registers with its group's scale (and minimum),
// then multiplied by the same 32 columns of every input row, kTile x kRows outputs at a time in independent vector
// accumulators (4 x 1 for one row: 4 accumulators, 4 decoded vectors; else 2 x 4: 8 and 4, within AVX2's 16). The products equal those of the dequantized float weights up to the order of
// the float32 sums. AVX2 where the CPU has it (kernels.py builds with -march=native), else plain C++.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "simd.h"

namespace {

using namespace lcdfast::simd;

constexpr int64_t kChunk = 32;  // columns per step: 32 int8 codes or 16 bytes of 4-bit codes

// One weight row's 32 codes at column chunk c, dequantized: out[0..31] as four 8-lane vectors (kLanes 8), or
// written to a float buffer on the portable path.
template <bool kFour>
inline void decode_chunk(const uint8_t* row, int64_t c, float scale, float low, vec (&out)[kChunk / kLanes]) {
#if defined(LCDFAST_AVX2)
  __m256 v[4];
  if constexpr (kFour) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 16));
    const __m128i nibble = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(bytes, nibble), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
    v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    v[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    v[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
    const __m256 s = _mm256_set1_ps(scale), m = _mm256_set1_ps(low);
    for (int i = 0; i < 4; ++i) out[i] = _mm256_fmadd_ps(v[i], s, m);
  } else {
    const int8_t* codes = reinterpret_cast<const int8_t*>(row) + c * kChunk;
    const __m256 s = _mm256_set1_ps(scale);
    for (int i = 0; i < 4; ++i) {
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * i));
      out[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), s);
    }
  }
#else
  for (int64_t j = 0; j < kChunk; ++j) {
    float code;
    if constexpr (kFour) {
      const uint8_t byte = row[c * 16 + (j & 15)];
      code = float(j < 16 ? byte & 15 : byte >> 4);
    } else {
      code = float(reinterpret_cast<const int8_t*>(row)[c * kChunk + j]);
    }
    out[j] = code * scale + low;
  }
#endif
}

// One scalar weight (the columns past the last whole chunk: int8 with one scale per row only).
template <bool kFour>
inline float weight_at(const uint8_t* row, int64_t e, float scale, float low) {
  if constexpr (kFour) {
    const uint8_t byte = row[(e / kChunk) * 16 + (e % 16)];
    return float((e % kChunk) < 16 ? byte & 15 : byte >> 4) * scale + low;
  } else {
    return float(reinterpret_cast<const int8_t*>(row)[e]) * scale;
  }
}

struct Weights {
  const uint8_t* q;
  int64_t row_bytes;  // K (int8) or K / 2 (4-bit)
  int64_t groups;     // K / G
  int64_t group;      // G
};

// sums[n][m] = w[n0 + n] . x[m] for kTile weight rows and MR input rows (float32, stride K).
template <int kTile, int kRows, int MR, bool kFour, typename scale_t>
void block(const Weights& w, const scale_t* scales, const scale_t* lows, int64_t n0, const float* x, int64_t K,
           float (&sums)[kTile][kRows]) {
  vec acc[kTile][MR];
  for (int n = 0; n < kTile; ++n)
    for (int m = 0; m < MR; ++m) acc[n][m] = splat(0.f);
  const int64_t chunks = K / kChunk;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t g = c * kChunk / w.group;
    for (int n = 0; n < kTile; ++n) {  // one row's chunk decoded (4 vectors), then used by every input row
      const int64_t at = (n0 + n) * w.groups + g;
      vec wv[kChunk / kLanes];
      decode_chunk<kFour>(w.q + (n0 + n) * w.row_bytes, c, float(scales[at]), lows ? float(lows[at]) : 0.f, wv);
      for (int m = 0; m < MR; ++m)
        for (int i = 0; i < kChunk / kLanes; ++i)
          acc[n][m] = fma(wv[i], load(x + m * K + c * kChunk + i * kLanes), acc[n][m]);
    }
  }
  for (int n = 0; n < kTile; ++n)
    for (int m = 0; m < MR; ++m) {
      float sum = hsum(acc[n][m]);
      for (int64_t e = chunks * kChunk; e < K; ++e) {
        const int64_t at = (n0 + n) * w.groups + e / w.group;
        sum += weight_at<kFour>(w.q + (n0 + n) * w.row_bytes, e, float(scales[at]), lows ? float(lows[at]) : 0.f) *
               x[m * K + e];
      }
      sums[n][m] = sum;
    }
}

template <int kTile, int kRows, bool kFour, typename scale_t>
void any_block(int mr, const Weights& w, const scale_t* scales, const scale_t* lows, int64_t n0, const float* x,
               int64_t K, float (&sums)[kTile][kRows]) {
  static_assert(kRows <= 4, "one case per row count");
  switch (mr) {
    case 1: return block<kTile, kRows, 1, kFour>(w, scales, lows, n0, x, K, sums);
    case 2: if constexpr (kRows >= 2) return block<kTile, kRows, 2, kFour>(w, scales, lows, n0, x, K, sums);
    case 3: if constexpr (kRows >= 3) return block<kTile, kRows, 3, kFour>(w, scales, lows, n0, x, K, sums);
    case 4: if constexpr (kRows >= 4) return block<kTile, kRows, 4, kFour>(w, scales, lows, n0, x, K, sums);
  }
}

template <int kTile, int kRows, bool kFour, typename scale_t>
void tiled(const Weights& w, const scale_t* scales, const scale_t* lows, const float* x, float* out, int64_t M,
           int64_t N, int64_t K) {
  auto rows = [&](int64_t n0, auto tile) {  // kTile weight rows from n0 (or one, for the rows past the last tile)
    constexpr int T = decltype(tile)::value;
    float sums[T][kRows];
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      const int mr = int(std::min<int64_t>(kRows, M - m0));
      any_block<T, kRows, kFour>(mr, w, scales, lows, n0, x + m0 * K, K, sums);
      for (int n = 0; n < T; ++n)
        for (int m = 0; m < mr; ++m) out[(m0 + m) * N + n0 + n] = sums[n][m];
    }
  };
  const int64_t tiles = N / kTile;
  at::parallel_for(0, tiles + (N % kTile ? 1 : 0), 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (t < tiles) {
        rows(t * kTile, std::integral_constant<int, kTile>{});
      } else {
        for (int64_t n = tiles * kTile; n < N; ++n) rows(n, std::integral_constant<int, 1>{});
      }
    }
  });
}

template <bool kFour, typename scale_t>
void products(const Weights& w, const scale_t* scales, const scale_t* lows, const float* x, float* out, int64_t M,
              int64_t N, int64_t K) {
  if (M == 1)
    tiled<4, 1, kFour>(w, scales, lows, x, out, M, N, K);
  else
    tiled<2, 4, kFour>(w, scales, lows, x, out, M, N, K);
}

at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                            const std::optional<at::Tensor>& low) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scale.dim() == 2, "quant_linear: x must be [M, K], q and scale 2-d, got ",
              x.sizes(), ", ", q.sizes(), ", ", scale.sizes());
  const bool four = q.scalar_type() == at::kByte;
  TORCH_CHECK(four || q.scalar_type() == at::kChar, "quant_linear: q must be int8 or uint8 (packed 4-bit), got ",
              q.scalar_type());
  const int64_t M = x.size(0), N = q.size(0), K = x.size(1);
  TORCH_CHECK(q.size(1) == (four ? K / 2 : K) && (!four || K % kChunk == 0), "quant_linear: q ", q.sizes(),
              " does not fit x ", x.sizes());
  TORCH_CHECK(scale.size(0) == N && scale.size(1) > 0 && K % scale.size(1) == 0, "quant_linear: scale ",
              scale.sizes(), " does not fit q ", q.sizes());
  const int64_t G = K / scale.size(1);
  TORCH_CHECK(scale.size(1) == 1 || G % kChunk == 0, "quant_linear: group size ", G, " is not a multiple of 32");
  TORCH_CHECK(four == low.has_value(), "quant_linear: 4-bit codes need `low`, int8 codes take none");
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf,
              "quant_linear: scale must be float32 or float16, got ", scale.scalar_type());
  if (low) {
    TORCH_CHECK(low->sizes() == scale.sizes() && low->scalar_type() == scale.scalar_type(),
                "quant_linear: low ", low->sizes(), " ", low->scalar_type(), " differs from scale");
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous(), qc = q.contiguous(), sc = scale.contiguous();
  const at::Tensor lc = low ? low->contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (out.numel() == 0) return out.to(x.scalar_type());
  const Weights w{reinterpret_cast<const uint8_t*>(qc.const_data_ptr()), qc.size(1), sc.size(1), G};
  const float* xp = xf.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (sc.scalar_type() == at::kHalf) {
    const c10::Half* lows = low ? lc.const_data_ptr<c10::Half>() : nullptr;
    four ? products<true>(w, sc.const_data_ptr<c10::Half>(), lows, xp, op, M, N, K)
         : products<false>(w, sc.const_data_ptr<c10::Half>(), lows, xp, op, M, N, K);
  } else {
    const float* lows = low ? lc.const_data_ptr<float>() : nullptr;
    four ? products<true>(w, sc.const_data_ptr<float>(), lows, xp, op, M, N, K)
         : products<false>(w, sc.const_data_ptr<float>(), lows, xp, op, M, N, K);
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lcdfast, m) {
  m.def("quant_linear(Tensor x, Tensor q, Tensor scale, Tensor? low) -> Tensor");
}

TORCH_LIBRARY_IMPL(lcdfast, CPU, m) {
  m.impl("quant_linear", &quant_linear_cpu);
}
