// The masked contrast op (DESIGN.md §4.3): an LM head's logits only at K token ids per row.
//
//   masked_logits(hidden [B, E], head [nb, E, Vb], ids [B, K] int64) -> [B, K] float32
//   out[b, k] = sum_e hidden[b, e] * head[ids[b, k] / Vb, e, ids[b, k] % Vb]
//
// `head` is lcdfast.model.Head's packed weight. The torch reference (contrast.amateur_logits_at) gathers the K
// columns into a [B, K, E] tensor first; here each column is read in place and summed in float32 (bf16, fp16, fp32).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace lcdfast {

// Shared with the CUDA impl (masked_contrast_cuda.cu).
void check_masked_logits_inputs(const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& ids) {
  TORCH_CHECK(hidden.dim() == 2, "masked_logits: hidden must be [B, E], got ", hidden.sizes());
  TORCH_CHECK(head.dim() == 3, "masked_logits: head must be packed [nb, E, Vb], got ", head.sizes());
  TORCH_CHECK(ids.dim() == 2, "masked_logits: ids must be [B, K], got ", ids.sizes());
  TORCH_CHECK(hidden.size(1) == head.size(1), "masked_logits: hidden ", hidden.sizes(), " and head ", head.sizes(),
              " differ in E");
  TORCH_CHECK(ids.size(0) == hidden.size(0), "masked_logits: ids ", ids.sizes(), " and hidden ", hidden.sizes(),
              " differ in B");
  TORCH_CHECK(ids.scalar_type() == at::kLong, "masked_logits: ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(hidden.scalar_type() == head.scalar_type(), "masked_logits: hidden is ", hidden.scalar_type(),
              " but head is ", head.scalar_type());
  TORCH_CHECK(hidden.device() == head.device() && ids.device() == head.device(),
              "masked_logits: inputs on different devices");
}

}  // namespace lcdfast

namespace {

at::Tensor masked_logits_cpu(const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& ids) {
  lcdfast::check_masked_logits_inputs(hidden, head, ids);
  const at::Tensor h = hidden.contiguous(), w = head.contiguous(), t = ids.contiguous();
  const int64_t B = t.size(0), K = t.size(1), E = w.size(1), Vb = w.size(2), V = w.size(0) * Vb;
  at::Tensor out = at::empty({B, K}, hidden.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const int64_t* ip = t.const_data_ptr<int64_t>();
  float* op = out.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "masked_logits_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    // One (b, k) is E strided loads; split into chunks of about 32768 loads (ATen's grain size).
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(E, 1));
    at::parallel_for(0, B * K, grain, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> offset(end - begin);  // of head[id / Vb, 0, id % Vb]
      std::vector<acc_t> acc(end - begin, acc_t(0));
      for (int64_t i = begin; i < end; ++i) {
        const int64_t id = ip[i];
        TORCH_CHECK(id >= 0 && id < V, "masked_logits: token id ", id, " out of range [0, ", V, ")");
        offset[i - begin] = (id / Vb) * E * Vb + id % Vb;
      }
      // Row by row, e outermost: at each e all of a row's ids are read at once (independent loads), and ids in
      // one vocab block share head[blk, e, :]'s page, so the columns cost fewer TLB misses than one at a time.
      for (int64_t lo = begin; lo < end;) {
        const int64_t b = lo / K, n = std::min(end, (b + 1) * K) - lo;
        const scalar_t* row = hp + b * E;  // hidden[b, :]
        const int64_t* off = offset.data() + (lo - begin);
        acc_t* sum = acc.data() + (lo - begin);
        for (int64_t e = 0; e < E; ++e) {
          const acc_t x = static_cast<acc_t>(row[e]);
          const scalar_t* head_e = wp + e * Vb;  // head[0, e, 0]
          for (int64_t j = 0; j < n; ++j) sum[j] += x * static_cast<acc_t>(head_e[off[j]]);
        }
        for (int64_t j = 0; j < n; ++j) op[lo + j] = static_cast<float>(sum[j]);
        lo += n;
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(lcdfast, m) {
  m.def("masked_logits(Tensor hidden, Tensor head, Tensor ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(lcdfast, CPU, m) {
  m.impl("masked_logits", &masked_logits_cpu);
}
