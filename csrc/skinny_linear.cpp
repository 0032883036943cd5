// Products with few rows, as in decoding (DESIGN.md §4): x [M, E] times a weight [N, E] transposed.
//
//   skinny_linear(x [M, E], weight [N, E]) -> [M, N] in x's dtype, summed in float32
//
// A decode step multiplies one to a few dozen rows (the batch, or DoLa's candidate layers stacked) by each weight
// matrix. BLAS packs the weight per call; inductor's fused reduction keeps one accumulator per output, so past one
// row it waits on FMA latency. Here each tile of kTile weight rows is read from memory once and, while it sits in
// L1, multiplied by every input row, kTile x kRows outputs at a time in independent vector accumulators (AVX2 where
// the CPU has it: kernels.py builds with -march=native; else plain C++), while a tile further on is prefetched.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "simd.h"

namespace {

using namespace lcdfast::simd;

// Outputs come in blocks of kTile weight rows by up to kRows input rows, in kTile x kRows accumulators:
// 3 x 4 (12 accumulators, 3 weight vectors and an input vector: 16 AVX2 registers; GCC folds the input loads into
// the FMAs, 15 loads per 12 FMAs, which measured no slower here than keeping them in a register);
// for 6 to 12 float32 rows that fit in L1 together (DoLa's candidate heads at batch 1, batch 8 but for the MLP's
// down projection) 1 x M, every input row against each weight row as it streams in, so loads from memory spread
// evenly over the FMAs (blocks of rows in turn leave the second block without any). Paired against 2 x 5 + 2 x 4
// (M = 9) and 3 x 4 (M = 8) on 2 AVX2 cores: SmolLM2's head at 9 rows 5.39 -> 4.95 ms, all of a step's products at
// 8 rows 26.4 -> 25.1 ms; no gain in bfloat16 (head 4.00 -> 4.13), which keeps the blocks below. 2 x 5 where
// blocks of 4 would end in a block of 1 or 2 rows and blocks of 5 end full or at 4 (M = 9, 10, 14).
constexpr int kAhead = 12;  // weight rows between the tile computed and the one prefetched
constexpr int64_t kRowsInL1 = 24 << 10;  // 1 x M blocks re-read all M input rows per weight row: keep them in L1

// sums[n][m] = w[n] . x[m] for kTile weight rows w (stride E) and MR float32 input rows x (stride E).
template <int kTile, int kRows, int MR, typename scalar_t>
void block(const scalar_t* w, const float* x, int64_t E, float (&sums)[kTile][kRows], const char* ahead) {
  vec acc[kTile][MR];
  for (int n = 0; n < kTile; ++n)
    for (int m = 0; m < MR; ++m) acc[n][m] = splat(0.f);
  const int64_t body = E - E % kLanes;
  // The weight tile due kAhead rows later, spread over the steps, so memory streams while this tile computes.
  constexpr int64_t step_bytes = kTile * kLanes * sizeof(scalar_t);
  for (int64_t e = 0, offset = 0; e < body; e += kLanes, offset += step_bytes) {
    if (ahead)
      for (int64_t line = 0; line < step_bytes; line += 64) __builtin_prefetch(ahead + offset + line);
    vec wv[kTile];
    for (int n = 0; n < kTile; ++n) wv[n] = load(w + n * E + e);
    for (int m = 0; m < MR; ++m) {
      const vec xv = load(x + m * E + e);
      for (int n = 0; n < kTile; ++n) acc[n][m] = fma(wv[n], xv, acc[n][m]);
    }
  }
  for (int n = 0; n < kTile; ++n)
    for (int m = 0; m < MR; ++m) {
      float sum = hsum(acc[n][m]);
      for (int64_t e = body; e < E; ++e) sum += static_cast<float>(w[n * E + e]) * x[m * E + e];
      sums[n][m] = sum;
    }
}

template <int kTile, int kRows, typename scalar_t>
void any_block(int mr, const scalar_t* w, const float* x, int64_t E, float (&sums)[kTile][kRows], const char* ahead) {
  static_assert(kRows <= 12, "one case per row count");
  switch (mr) {
#define LCDFAST_ROWS(r) \
    case r: if constexpr (kRows >= r) return block<kTile, kRows, r>(w, x, E, sums, ahead);
    LCDFAST_ROWS(1) LCDFAST_ROWS(2) LCDFAST_ROWS(3) LCDFAST_ROWS(4) LCDFAST_ROWS(5) LCDFAST_ROWS(6)
    LCDFAST_ROWS(7) LCDFAST_ROWS(8) LCDFAST_ROWS(9) LCDFAST_ROWS(10) LCDFAST_ROWS(11) LCDFAST_ROWS(12)
#undef LCDFAST_ROWS
  }
}

template <int kTile, int kRows, typename scalar_t>
void tiled_rows(const scalar_t* wp, const float* xp, float* op, int64_t M, int64_t N, int64_t E) {
  if (N < kTile) {  // too few rows for one tile: plain dot products
    for (int64_t n = 0; n < N; ++n)
      for (int64_t m = 0; m < M; ++m) {
        float sum = 0;
        for (int64_t e = 0; e < E; ++e) sum += static_cast<float>(wp[n * E + e]) * xp[m * E + e];
        op[m * N + n] = sum;
      }
    return;
  }
  const int64_t tiles = (N + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    float sums[kTile][kRows];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = std::min(t * kTile, N - kTile);  // the last tile overlaps its neighbour
      const char* later = reinterpret_cast<const char*>(wp + std::min(n0 + kAhead, N - kTile) * E);
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const int mr = int(std::min<int64_t>(kRows, M - m0));
        const char* ahead = m0 == 0 ? later : nullptr;  // prefetch once per tile
        any_block<kTile, kRows, scalar_t>(mr, wp + n0 * E, xp + m0 * E, E, sums, ahead);
        for (int n = 0; n < kTile; ++n)
          for (int m = 0; m < mr; ++m) op[(m0 + m) * N + n0 + n] = sums[n][m];
      }
    }
  });
}

template <typename scalar_t>
void skinny_linear_rows(const scalar_t* wp, const float* xp, float* op, int64_t M, int64_t N, int64_t E) {
  if (std::is_same_v<scalar_t, float> && M >= 6 && M <= 12 && M * E * int64_t(sizeof(float)) <= kRowsInL1)
    tiled_rows<1, 12>(wp, xp, op, M, N, E);
  else if (M > 5 && (M % 5 == 0 || M % 5 == 4) && (M % 4 == 1 || M % 4 == 2))
    tiled_rows<2, 5>(wp, xp, op, M, N, E);
  else
    tiled_rows<3, 4>(wp, xp, op, M, N, E);
}

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "skinny_linear: x must be [M, E] and weight [N, E], got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "skinny_linear: x ", x.sizes(), " and weight ", weight.sizes(),
              " differ in E");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "skinny_linear: x is ", x.scalar_type(), " but weight is ",
              weight.scalar_type());
  const at::ScalarType dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "skinny_linear: float32, bfloat16 or float16 only, got ", dtype);
  const at::Tensor xf = x.to(at::kFloat).contiguous(), w = weight.contiguous();
  const int64_t M = x.size(0), N = w.size(0), E = w.size(1);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (out.numel() == 0) return out.to(x.scalar_type());
  const float* xp = xf.const_data_ptr<float>();
  float* op = out.data_ptr<float>();

  if (dtype == at::kFloat)
    skinny_linear_rows(w.const_data_ptr<float>(), xp, op, M, N, E);
  else if (dtype == at::kBFloat16)
    skinny_linear_rows(w.const_data_ptr<c10::BFloat16>(), xp, op, M, N, E);
  else
    skinny_linear_rows(w.const_data_ptr<c10::Half>(), xp, op, M, N, E);
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lcdfast, m) {
  m.def("skinny_linear(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(lcdfast, CPU, m) {
  m.impl("skinny_linear", &skinny_linear_cpu);
}
