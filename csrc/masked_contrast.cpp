// The masked contrast op (DESIGN.md §4.3): an LM head's logits only at K token ids per row.
//
//   masked_logits(hidden [B, E], head [V, E], ids [B, K] int64) -> [B, K] float32
//   out[b, k] = sum_e hidden[b, e] * head[ids[b, k], e]
//
// The torch reference (contrast.amateur_logits_at) gathers the K head rows into a [B, K, E] tensor first; here
// each row is read in place and summed in float32 (bf16, fp16, fp32).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

namespace lcdfast {

// Shared with the CUDA impl (masked_contrast_cuda.cu).
void check_masked_logits_inputs(const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& ids) {
  TORCH_CHECK(hidden.dim() == 2, "masked_logits: hidden must be [B, E], got ", hidden.sizes());
  TORCH_CHECK(head.dim() == 2, "masked_logits: head must be [V, E], got ", head.sizes());
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
  const int64_t B = t.size(0), K = t.size(1), V = w.size(0), E = w.size(1);
  at::Tensor out = at::empty({B, K}, hidden.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const int64_t* ip = t.const_data_ptr<int64_t>();
  float* op = out.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "masked_logits_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    // One (b, k) is a dot product of two contiguous rows of E; chunks of about 32768 loads (ATen's grain size).
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(E, 1));
    at::parallel_for(0, B * K, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t id = ip[i];
        TORCH_CHECK(id >= 0 && id < V, "masked_logits: token id ", id, " out of range [0, ", V, ")");
        const scalar_t* x = hp + (i / K) * E;  // hidden[b, :]
        const scalar_t* r = wp + id * E;       // head[id, :]
        acc_t lanes[8] = {};  // eight partial sums the compiler can keep in one vector register
        int64_t e = 0;
        for (; e + 8 <= E; e += 8) {
          for (int j = 0; j < 8; ++j) lanes[j] += static_cast<acc_t>(x[e + j]) * static_cast<acc_t>(r[e + j]);
        }
        acc_t sum = 0;
        for (; e < E; ++e) sum += static_cast<acc_t>(x[e]) * static_cast<acc_t>(r[e]);
        for (int j = 0; j < 8; ++j) sum += lanes[j];
        op[i] = static_cast<float>(sum);
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
