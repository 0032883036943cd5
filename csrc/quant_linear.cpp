// Products with few rows from weight-only quantized weights (quant.py's layout), float activations:
//
//   quant_linear(x [M, K], q, scale [N, K/G], low [N, K/G] or None) -> [M, N] in x's dtype, summed in float32
//   q: int8 codes [N, K] (w = q * scale), or 4-bit codes packed uint8 [N, K/2] (w = q * scale + low), where in each
//   chunk of 32 columns byte j holds column j in its low nibble and column j + 16 in its high one (GGUF's Q4 order).
//
// Decoding reads every weight once per token, so the codes are what streams from memory: each chunk of 32 codes of a
// weight row is loaded once and widened to float32 in registers, multiplied by the same 32 columns of every input
// row and summed, and that sum scaled by the chunk's group scale into the row's accumulator (once per chunk, not per
// weight; with one scale per row, once at the end); the minimums add low times the chunk's sum of x, computed once
// per call. kTile x kRows outputs at a time in independent accumulators (4 x 1 for one input row, else 2 x 4). The
// result equals the product with the dequantized weights up to the order of the float32 sums. AVX-512 or AVX2 where
// the CPU has them (kernels.py builds with -march=native), else plain C++.
//
//   quant_linear_a8(x [M, K], q, scale, low) -> [M, N]: the same product with x quantized too, llama.cpp's way: each
//   block of 32 columns of a row of x as int8 codes times one float32 scale (its largest magnitude / 127, codes
//   rounded half to even: quant.quantize_activations is the reference), so a chunk's 32 products are integer
//   multiply-adds (AVX-VNNI / AVX512-VNNI's dpbusd, else AVX2's maddubs + madd), summed exactly in int32, and
//   converted once per chunk: times the weight group's scale and the block's, plus low times the block's sum of
//   codes times its scale. Equal to the float product of the dequantized weights and quantize_activations(x) up to
//   the order of the float32 sums.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>

#include "simd.h"

namespace {

constexpr int64_t kChunk = 32;  // columns per step: 32 int8 codes or 16 bytes of 4-bit codes

// The lanes: 16 float32 with AVX-512 (F, BW), else simd.h's (8 with AVX2, else 1).
#if defined(__AVX512F__) && defined(__AVX512BW__)
using vec = __m512;
constexpr int kLanes = 16;
inline vec splat(float a) { return _mm512_set1_ps(a); }
inline vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec load(const float* p) { return _mm512_loadu_ps(p); }
inline float hsum(vec a) { return _mm512_reduce_add_ps(a); }
#else
using lcdfast::simd::fma, lcdfast::simd::hsum, lcdfast::simd::kLanes, lcdfast::simd::load, lcdfast::simd::splat,
    lcdfast::simd::vec;
#if defined(LCDFAST_AVX2)
inline vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
#else
inline vec mul(vec a, vec b) { return a * b; }
#endif
#endif
constexpr int kVecs = kChunk / kLanes;  // vectors per chunk

// A scale as float32: float16 through F16C's one instruction where the CPU has it (c10::Half's own conversion is
// a dozen integer operations).
inline float to_float(float a) { return a; }
inline float to_float(c10::Half a) {
#if defined(__F16C__)
  return _cvtsh_ss(a.x);
#else
  return static_cast<float>(a);
#endif
}

// One code as float32 (the portable path, and the columns past the last whole chunk: int8, one scale per row).
template <bool kFour>
inline float code_at(const uint8_t* row, int64_t e) {
  if constexpr (kFour) {
    const uint8_t byte = row[(e / kChunk) * 16 + (e % 16)];
    return float((e % kChunk) < 16 ? byte & 15 : byte >> 4);
  }
  return float(reinterpret_cast<const int8_t*>(row)[e]);
}

// One weight row's 32 codes at column chunk c, as float32 vectors.
template <bool kFour>
inline void codes_chunk(const uint8_t* row, int64_t c, vec (&out)[kVecs]) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if constexpr (kFour) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 16));
    const __m128i nibble = _mm_set1_epi8(15);
    out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, nibble)));  // columns 0..15
    out[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble)));  // 16..31
  } else {
    const __m128i* codes = reinterpret_cast<const __m128i*>(row + c * kChunk);
    out[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(codes)));
    out[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(codes + 1)));
  }
#elif defined(LCDFAST_AVX2)
  if constexpr (kFour) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 16));
    const __m128i nibble = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(bytes, nibble), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  } else {
    const int8_t* codes = reinterpret_cast<const int8_t*>(row) + c * kChunk;
    for (int i = 0; i < 4; ++i) {
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * i));  // 8 codes
      out[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
    }
  }
#else
  for (int64_t j = 0; j < kChunk; ++j) out[j] = code_at<kFour>(row, c * kChunk + j);
#endif
}

constexpr int64_t kSpan = 8;  // chunks whose scales are read as one vector (groups of 32: a scale per chunk)

template <typename scale_t>
struct Job {
  const uint8_t* q;
  int64_t row_bytes;  // K (int8) or K / 2 (4-bit)
  int64_t groups;     // K / G
  int64_t group;      // G
  const scale_t* scales;
  const scale_t* lows;  // nullptr: symmetric codes
  const float* x;       // [M, K]
  const float* xsums;   // [M, K / 32]: each chunk's sum of x (when lows)
  float* out;           // [M, N]
  int64_t M, N, K;
};

// Chunks c.. of kTile rows with one weight scale at a time (any group size; with one scale per row, 1 here and the
// row's scale at the end): per chunk, the minimums' term low * x_sum(m, c) into low_sums, then step(c, w_scale).
template <int kTile, int MR, bool kPerRow, typename scale_t, typename Sums, typename Step>
void chunks_from(const Job<scale_t>& job, int64_t n0, int64_t c, int64_t chunks, float (&low_sums)[kTile][MR],
                 Sums x_sum, Step step) {
  const int64_t group_chunks = kPerRow ? chunks + 1 : job.group / kChunk;
  for (int64_t g = c / group_chunks, left = group_chunks - c % group_chunks; c < chunks; ++c) {  // g: c's group
    if (left-- == 0) {
      ++g;
      left = group_chunks - 1;
    }
    float w_scale[kTile];
    for (int n = 0; n < kTile; ++n) {
      const int64_t at = (n0 + n) * job.groups + g;
      w_scale[n] = kPerRow ? 1.f : to_float(job.scales[at]);
      if (job.lows) {
        const float low = to_float(job.lows[at]);
        for (int m = 0; m < MR; ++m) low_sums[n][m] += low * x_sum(m, c);
      }
    }
    step(c, w_scale);
  }
}

// sums[n][m] = w[n0 + n] . x[m0 + m] for kTile weight rows and MR input rows. With groups of 32 (a scale per chunk)
// the scales and the minimums' terms are read 8 chunks at a time, in vectors.
template <int kTile, int kRows, int MR, bool kFour, bool kPerRow, typename scale_t>
void block(const Job<scale_t>& job, int64_t n0, int64_t m0, float (&sums)[kTile][kRows]) {
  const int64_t K = job.K, chunks = K / kChunk;
  const float* x = job.x + m0 * K;
  vec acc[kTile][MR];
  float low_sums[kTile][MR] = {};
  for (int n = 0; n < kTile; ++n)
    for (int m = 0; m < MR; ++m) acc[n][m] = splat(0.f);
  // chunk c of every row times every input row, scaled by scale(n) (unless one scale per row: at the end)
  auto step = [&](int64_t c, auto scale) {
    for (int n = 0; n < kTile; ++n) {  // one row's chunk widened, then used by every input row
      vec codes[kVecs];
      codes_chunk<kFour>(job.q + (n0 + n) * job.row_bytes, c, codes);
      if constexpr (kPerRow) {
        for (int m = 0; m < MR; ++m)
          for (int i = 0; i < kVecs; ++i)
            acc[n][m] = fma(codes[i], load(x + m * K + c * kChunk + i * kLanes), acc[n][m]);
      } else {
        const vec w_scale = splat(scale(n));
        for (int m = 0; m < MR; ++m) {
          const float* xc = x + m * K + c * kChunk;
          vec part = mul(codes[0], load(xc));
          for (int i = 1; i < kVecs; ++i) part = fma(codes[i], load(xc + i * kLanes), part);
          acc[n][m] = fma(part, w_scale, acc[n][m]);
        }
      }
    }
  };
  int64_t c = 0;
#if defined(LCDFAST_AVX2)
  if (!kPerRow && job.group == kChunk) {
    __m256 low_acc[kTile][MR];
    for (int n = 0; n < kTile; ++n)
      for (int m = 0; m < MR; ++m) low_acc[n][m] = _mm256_setzero_ps();
    for (; c + kSpan <= chunks; c += kSpan) {
      alignas(32) float scales[kTile][kSpan];
      for (int n = 0; n < kTile; ++n) {
        const int64_t at = (n0 + n) * job.groups + c;
        _mm256_store_ps(scales[n], lcdfast::simd::load(job.scales + at));
        if (job.lows) {
          const __m256 lows = lcdfast::simd::load(job.lows + at);
          for (int m = 0; m < MR; ++m)
            low_acc[n][m] = _mm256_fmadd_ps(lows, _mm256_loadu_ps(job.xsums + (m0 + m) * chunks + c), low_acc[n][m]);
        }
      }
      for (int64_t j = 0; j < kSpan; ++j) step(c + j, [&](int n) { return scales[n][j]; });
    }
    for (int n = 0; n < kTile; ++n)
      for (int m = 0; m < MR; ++m) low_sums[n][m] = lcdfast::simd::hsum(low_acc[n][m]);
  }
#endif
  // the remaining chunks
  chunks_from<kTile, MR, kPerRow>(
      job, n0, c, chunks, low_sums, [&](int m, int64_t c) { return job.xsums[(m0 + m) * chunks + c]; },
      [&](int64_t c, const float (&w_scale)[kTile]) { step(c, [&](int n) { return w_scale[n]; }); });
  for (int n = 0; n < kTile; ++n)
    for (int m = 0; m < MR; ++m) {
      float sum = hsum(acc[n][m]);
      for (int64_t e = chunks * kChunk; e < K; ++e)
        sum += code_at<kFour>(job.q + (n0 + n) * job.row_bytes, e) * x[m * K + e];
      if constexpr (kPerRow) sum *= to_float(job.scales[(n0 + n) * job.groups]);
      sums[n][m] = sum + low_sums[n][m];
    }
}

template <int kTile, int kRows, bool kFour, bool kPerRow, typename scale_t>
void rows_from(const Job<scale_t>& job, int64_t n0) {
  float sums[kTile][kRows];
  for (int64_t m0 = 0; m0 < job.M; m0 += kRows) {
    const int mr = int(std::min<int64_t>(kRows, job.M - m0));
    switch (mr) {
      case 1: block<kTile, kRows, 1, kFour, kPerRow>(job, n0, m0, sums); break;
      case 2: if constexpr (kRows >= 2) block<kTile, kRows, 2, kFour, kPerRow>(job, n0, m0, sums); break;
      case 3: if constexpr (kRows >= 3) block<kTile, kRows, 3, kFour, kPerRow>(job, n0, m0, sums); break;
      case 4: if constexpr (kRows >= 4) block<kTile, kRows, 4, kFour, kPerRow>(job, n0, m0, sums); break;
    }
    for (int n = 0; n < kTile; ++n)
      for (int m = 0; m < mr; ++m) job.out[(m0 + m) * job.N + n0 + n] = sums[n][m];
  }
}

template <int kTile, int kRows, bool kFour, bool kPerRow, typename scale_t>
void tiled(const Job<scale_t>& job) {
  const int64_t tiles = job.N / kTile;
  at::parallel_for(0, tiles + (job.N % kTile ? 1 : 0), 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (t < tiles) {
        rows_from<kTile, kRows, kFour, kPerRow>(job, t * kTile);
      } else {  // the rows past the last whole tile, one at a time
        for (int64_t n = tiles * kTile; n < job.N; ++n) rows_from<1, kRows, kFour, kPerRow>(job, n);
      }
    }
  });
}

template <bool kFour, typename scale_t>
void products(const Job<scale_t>& job) {
  const bool per_row = job.groups == 1;
  if (job.M == 1)
    per_row ? tiled<4, 1, kFour, true>(job) : tiled<4, 1, kFour, false>(job);
  else
    per_row ? tiled<2, 4, kFour, true>(job) : tiled<2, 4, kFour, false>(job);
}

// The checks and set-up both products share: `run(job, four)` fills job.out from a Job over x as float32 (xsums:
// each chunk's sum of x, for the minimums' term, when `with_sums`).
template <typename Run>
at::Tensor product(const char* op, const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                   const std::optional<at::Tensor>& low, bool with_sums, Run run) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scale.dim() == 2, op, ": x must be [M, K], q and scale 2-d, got ",
              x.sizes(), ", ", q.sizes(), ", ", scale.sizes());
  const bool four = q.scalar_type() == at::kByte;
  TORCH_CHECK(four || q.scalar_type() == at::kChar, op, ": q must be int8 or uint8 (packed 4-bit), got ",
              q.scalar_type());
  const int64_t M = x.size(0), N = q.size(0), K = x.size(1);
  TORCH_CHECK(q.size(1) == (four ? K / 2 : K) && (!four || K % kChunk == 0), op, ": q ", q.sizes(),
              " does not fit x ", x.sizes());
  TORCH_CHECK(scale.size(0) == N && scale.size(1) > 0 && K % scale.size(1) == 0, op, ": scale ", scale.sizes(),
              " does not fit q ", q.sizes());
  const int64_t G = K / scale.size(1);
  TORCH_CHECK(scale.size(1) == 1 || G % kChunk == 0, op, ": group size ", G, " is not a multiple of 32");
  TORCH_CHECK(four == low.has_value(), op, ": 4-bit codes need `low`, int8 codes take none");
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf, op,
              ": scale must be float32 or float16, got ", scale.scalar_type());
  if (low) {
    TORCH_CHECK(low->sizes() == scale.sizes() && low->scalar_type() == scale.scalar_type(), op, ": low ",
                low->sizes(), " ", low->scalar_type(), " differs from scale");
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous(), qc = q.contiguous(), sc = scale.contiguous();
  const at::Tensor lc = low ? low->contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (out.numel() == 0) return out.to(x.scalar_type());
  const bool sums = with_sums && low;  // [M, K / 32]: 4-bit codes always have whole chunks
  const at::Tensor xsums = sums ? xf.view({M, K / kChunk, kChunk}).sum(-1).contiguous() : at::Tensor();
  auto dispatch = [&](auto tag) {
    using scale_t = decltype(tag);
    const Job<scale_t> job{reinterpret_cast<const uint8_t*>(qc.const_data_ptr()), qc.size(1), sc.size(1), G,
                           sc.const_data_ptr<scale_t>(), low ? lc.const_data_ptr<scale_t>() : nullptr,
                           xf.const_data_ptr<float>(), sums ? xsums.const_data_ptr<float>() : nullptr,
                           out.data_ptr<float>(), M, N, K};
    run(job, four);
  };
  if (sc.scalar_type() == at::kHalf)
    dispatch(c10::Half{});
  else
    dispatch(float{});
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                            const std::optional<at::Tensor>& low) {
  return product("quant_linear", x, q, scale, low, true,
                 [](const auto& job, bool four) { four ? products<true>(job) : products<false>(job); });
}

// ---- quant_linear_a8: int8 activations ----

// x quantized per row in blocks of 32 columns (the last block of a row may be shorter).
struct Codes8 {
  const int8_t* q;   // [M, K]
  const float* d;    // [M, B]: each block's scale, B = ceil(K / 32)
  const float* s;    // [M, B]: each block's scale times its sum of codes (the minimums' term)
  int64_t blocks;    // B
};

#if defined(LCDFAST_AVX2)
// 8 int32 sums of 4 products each, of 32 unsigned (0..127 or 0..15) by 32 signed bytes.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));  // pairs fit int16: 2 * 128 * 127
#endif
}

// One weight row's 32 codes at chunk c as bytes in column order: 4-bit codes 0..15 (unsigned), or int8 codes.
template <bool kFour>
inline __m256i code_bytes(const uint8_t* row, int64_t c) {
  if constexpr (kFour) {
    // the 16 bytes in both lanes, the high lane shifted by 4: low nibbles (columns 0..15), then high (16..31)
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 16)));
    return _mm256_and_si256(_mm256_srlv_epi64(both, _mm256_set_epi64x(4, 4, 0, 0)), _mm256_set1_epi8(15));
  }
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * kChunk));
}
#endif

// The integer dot product of a weight row's chunk c with 32 activation codes, without vectors.
template <bool kFour>
inline int32_t chunk_dot(const uint8_t* row, int64_t c, const int8_t* xq) {
  int32_t sum = 0;
  for (int64_t j = 0; j < kChunk; ++j) {
    const int64_t e = c * kChunk + j;
    sum += int32_t(code_at<kFour>(row, e)) * xq[e];
  }
  return sum;
}


// sums[n][m] = w[n0 + n] . x[m0 + m] with x as its int8 codes. Per chunk and pair of rows, one integer product of
// 32 codes and one float multiply-add of its 8 partial sums by the weight group's scale times the block's; with
// groups of 32, those scales (and the minimums' terms) are computed 8 chunks at a time, in vectors.
template <int kTile, int kRows, int MR, bool kFour, bool kPerRow, typename scale_t>
void block_a8(const Job<scale_t>& job, const Codes8& xc, int64_t n0, int64_t m0, float (&sums)[kTile][kRows]) {
  const int64_t K = job.K, chunks = K / kChunk, B = xc.blocks;
  const int8_t* xq = xc.q + m0 * K;
  const float* xd = xc.d + m0 * B;
  const float* xs = xc.s + m0 * B;
  float low_sums[kTile][MR] = {};
  const uint8_t* rows[kTile];
  for (int n = 0; n < kTile; ++n) rows[n] = job.q + (n0 + n) * job.row_bytes;
  int64_t c = 0;
#if !defined(LCDFAST_AVX2)
  float acc[kTile][MR] = {};
#else
  __m256 acc[kTile][MR], low_acc[kTile][MR];
  for (int n = 0; n < kTile; ++n)
    for (int m = 0; m < MR; ++m) acc[n][m] = low_acc[n][m] = _mm256_setzero_ps();
  // chunk c of every row times every input row, each product scaled by scale(n, m)
  auto step = [&](int64_t c, auto scale) {
    for (int n = 0; n < kTile; ++n) {
      __m256i u = code_bytes<kFour>(rows[n], c);
      const __m256i signs = u;  // int8 codes: |w| times x with w's sign
      if constexpr (!kFour) u = _mm256_abs_epi8(u);
      for (int m = 0; m < MR; ++m) {
        __m256i x8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + c * kChunk));
        if constexpr (!kFour) x8 = _mm256_sign_epi8(x8, signs);
        const __m256 dots = _mm256_cvtepi32_ps(dot_u8s8(u, x8));
        acc[n][m] = _mm256_fmadd_ps(dots, _mm256_set1_ps(scale(n, m)), acc[n][m]);
      }
    }
  };
  if (!kPerRow && job.group == kChunk) {
    for (; c + kSpan <= chunks; c += kSpan) {
      alignas(32) float scales[kTile][MR][kSpan];
      for (int n = 0; n < kTile; ++n) {
        const int64_t at = (n0 + n) * job.groups + c;
        const __m256 w_scales = lcdfast::simd::load(job.scales + at);
        for (int m = 0; m < MR; ++m)
          _mm256_store_ps(scales[n][m], _mm256_mul_ps(w_scales, lcdfast::simd::load(xd + m * B + c)));
        if (job.lows) {
          const __m256 lows = lcdfast::simd::load(job.lows + at);
          for (int m = 0; m < MR; ++m)
            low_acc[n][m] = _mm256_fmadd_ps(lows, lcdfast::simd::load(xs + m * B + c), low_acc[n][m]);
        }
      }
      for (int64_t j = 0; j < kSpan; ++j) step(c + j, [&](int n, int m) { return scales[n][m][j]; });
    }
  }
#endif
  // the remaining chunks
  chunks_from<kTile, MR, kPerRow>(job, n0, c, chunks, low_sums, [&](int m, int64_t c) { return xs[m * B + c]; },
                                  [&](int64_t c, const float (&w_scale)[kTile]) {
#if defined(LCDFAST_AVX2)
    step(c, [&](int n, int m) { return w_scale[n] * xd[m * B + c]; });
#else
    for (int n = 0; n < kTile; ++n)
      for (int m = 0; m < MR; ++m)
        acc[n][m] += float(chunk_dot<kFour>(rows[n], c, xq + m * K)) * (w_scale[n] * xd[m * B + c]);
#endif
  });
  for (int n = 0; n < kTile; ++n)
    for (int m = 0; m < MR; ++m) {
#if defined(LCDFAST_AVX2)
      float sum = lcdfast::simd::hsum(acc[n][m]);
      low_sums[n][m] += lcdfast::simd::hsum(low_acc[n][m]);
#else
      float sum = acc[n][m];
#endif
      if (chunks * kChunk < K) {  // int8 codes with one scale per row: the last, shorter block
        int32_t tail = 0;
        for (int64_t e = chunks * kChunk; e < K; ++e) tail += int32_t(code_at<kFour>(rows[n], e)) * xq[m * K + e];
        sum += float(tail) * xd[m * B + chunks];
      }
      if constexpr (kPerRow) sum *= to_float(job.scales[(n0 + n) * job.groups]);
      sums[n][m] = sum + low_sums[n][m];
    }
}

template <int kTile, int kRows, bool kFour, bool kPerRow, typename scale_t>
void rows_from_a8(const Job<scale_t>& job, const Codes8& xc, int64_t n0) {
  float sums[kTile][kRows];
  for (int64_t m0 = 0; m0 < job.M; m0 += kRows) {
    const int mr = int(std::min<int64_t>(kRows, job.M - m0));
    switch (mr) {
      case 1: block_a8<kTile, kRows, 1, kFour, kPerRow>(job, xc, n0, m0, sums); break;
      case 2: if constexpr (kRows >= 2) block_a8<kTile, kRows, 2, kFour, kPerRow>(job, xc, n0, m0, sums); break;
      case 3: if constexpr (kRows >= 3) block_a8<kTile, kRows, 3, kFour, kPerRow>(job, xc, n0, m0, sums); break;
      case 4: if constexpr (kRows >= 4) block_a8<kTile, kRows, 4, kFour, kPerRow>(job, xc, n0, m0, sums); break;
    }
    for (int n = 0; n < kTile; ++n)
      for (int m = 0; m < mr; ++m) job.out[(m0 + m) * job.N + n0 + n] = sums[n][m];
  }
}

template <int kTile, int kRows, bool kFour, bool kPerRow, typename scale_t>
void tiled_a8(const Job<scale_t>& job, const Codes8& xc) {
  const int64_t tiles = job.N / kTile;
  at::parallel_for(0, tiles + (job.N % kTile ? 1 : 0), 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (t < tiles) {
        rows_from_a8<kTile, kRows, kFour, kPerRow>(job, xc, t * kTile);
      } else {
        for (int64_t n = tiles * kTile; n < job.N; ++n) rows_from_a8<1, kRows, kFour, kPerRow>(job, xc, n);
      }
    }
  });
}

template <bool kFour, typename scale_t>
void products_a8(const Job<scale_t>& job, const Codes8& xc) {
  const bool per_row = job.groups == 1;
  if (job.M == 1)
    per_row ? tiled_a8<4, 1, kFour, true>(job, xc) : tiled_a8<4, 1, kFour, false>(job, xc);
  else
    per_row ? tiled_a8<2, 4, kFour, true>(job, xc) : tiled_a8<2, 4, kFour, false>(job, xc);
}

// x [M, K] float32 -> int8 codes, per-block scales and scaled sums (as quant.quantize_activations computes them).
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* d, float* s) {
  const int64_t B = (K + kChunk - 1) / kChunk;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t begin = b * kChunk, end = std::min(K, begin + kChunk);
      const float* xb = x + m * K;
      float amax = 0.f;
      for (int64_t e = begin; e < end; ++e) amax = std::max(amax, std::fabs(xb[e]));
      const float scale = amax > 0.f ? amax / 127.f : 1.f;
      int32_t total = 0;
      for (int64_t e = begin; e < end; ++e) {
        const float code = std::min(127.f, std::max(-127.f, std::nearbyint(xb[e] / scale)));
        q[m * K + e] = int8_t(code);
        total += int32_t(code);
      }
      d[m * B + b] = scale;
      s[m * B + b] = scale * float(total);
    }
}

at::Tensor quant_linear_a8_cpu(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                               const std::optional<at::Tensor>& low) {
  return product("quant_linear_a8", x, q, scale, low, false, [&](const auto& job, bool four) {
    const int64_t B = (job.K + kChunk - 1) / kChunk;
    at::Tensor xq = at::empty({job.M, job.K}, x.options().dtype(at::kChar));
    at::Tensor xd = at::empty({job.M, B}, x.options().dtype(at::kFloat)), xs = at::empty({job.M, B}, xd.options());
    quantize_rows(job.x, job.M, job.K, xq.data_ptr<int8_t>(), xd.data_ptr<float>(), xs.data_ptr<float>());
    const Codes8 codes{xq.const_data_ptr<int8_t>(), xd.const_data_ptr<float>(), xs.const_data_ptr<float>(), B};
    four ? products_a8<true>(job, codes) : products_a8<false>(job, codes);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lcdfast, m) {
  m.def("quant_linear(Tensor x, Tensor q, Tensor scale, Tensor? low) -> Tensor");
  m.def("quant_linear_a8(Tensor x, Tensor q, Tensor scale, Tensor? low) -> Tensor");
}

TORCH_LIBRARY_IMPL(lcdfast, CPU, m) {
  m.impl("quant_linear", &quant_linear_cpu);
  m.impl("quant_linear_a8", &quant_linear_a8_cpu);
}
