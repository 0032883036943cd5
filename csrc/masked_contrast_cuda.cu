// CUDA impl of lcdfast::masked_logits (defined in masked_contrast.cpp): one warp per (b, k) reduces over E.
//
//   out[b, k] = sum_e hidden[b, e] * head[ids[b, k], e]     -> [B, K] float32

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

namespace lcdfast {
void check_masked_logits_inputs(const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& ids);
}

namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;

template <typename scalar_t>
__global__ void masked_logits_kernel(const scalar_t* __restrict__ hidden, const scalar_t* __restrict__ head,
                                     const int64_t* __restrict__ ids, float* __restrict__ out, int64_t rows,
                                     int64_t K, int64_t E, int64_t V) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;  // b * K + k
  if (i >= rows) return;  // the whole warp leaves together
  const int64_t id = ids[i];
  CUDA_KERNEL_ASSERT(id >= 0 && id < V);
  const scalar_t* row = hidden + (i / K) * E;  // hidden[b, :]
  const scalar_t* col = head + id * E;         // head[id, :]
  acc_t acc = 0;
  for (int64_t e = lane; e < E; e += kWarpSize) {
    acc += static_cast<acc_t>(row[e]) * static_cast<acc_t>(col[e]);
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    acc += __shfl_down_sync(0xffffffffu, acc, offset);
  }
  if (lane == 0) out[i] = static_cast<float>(acc);
}

at::Tensor masked_logits_cuda(const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& ids) {
  lcdfast::check_masked_logits_inputs(hidden, head, ids);
  const c10::cuda::CUDAGuard guard(head.device());
  const at::Tensor h = hidden.contiguous(), w = head.contiguous(), t = ids.contiguous();
  const int64_t B = t.size(0), K = t.size(1), V = w.size(0), E = w.size(1);
  at::Tensor out = at::empty({B, K}, hidden.options().dtype(at::kFloat));
  const int64_t rows = B * K;
  if (rows == 0) return out;
  const unsigned int blocks = static_cast<unsigned int>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "masked_logits_cuda", [&] {
    masked_logits_kernel<scalar_t><<<blocks, kWarpsPerBlock * kWarpSize, 0, stream>>>(
        h.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(),
        out.data_ptr<float>(), rows, K, E, V);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lcdfast, CUDA, m) {
  m.impl("masked_logits", &masked_logits_cuda);
}
