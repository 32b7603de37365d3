// CUDA kernels of the cce operators: cce::linear_cross_entropy<T> for bf16, fp16 and fp32, on the current stream of
// the inputs' device, with every buffer taken from PyTorch's caching allocator.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cce/cce.cuh>

#include "binding.hpp"

namespace cce_torch {
namespace {

template <class T>
struct cuda_exec {
  cce::linear_cross_entropy<T> op;
  cce::device_info dev;
  cudaStream_t stream;

  explicit cuda_exec(const cce::options& o) : op(o), stream(at::cuda::getCurrentCUDAStream()) {
    check(cce::current_device(dev), "device query");
  }
  std::size_t saved_bytes(const cce::problem<T>& p) const { return op.saved_bytes(p); }
  std::size_t workspace_bytes(const cce::problem<T>& p, std::size_t budget) const {
    return op.workspace_bytes(p, dev, budget);
  }
  cce::status forward(const cce::problem<T>& p, const cce::forward_outputs& out, void* saved, std::size_t saved_size,
                      void* ws, std::size_t ws_size) const {
    return op.forward(p, out, saved, saved_size, ws, ws_size, stream);
  }
  cce::status backward(const cce::problem<T>& p, cce::loss_gradient g, const cce::gradients<T>& out, const void* saved,
                       std::size_t saved_size, void* ws, std::size_t ws_size) const {
    return op.backward(p, g, out, saved, saved_size, ws, ws_size, stream);
  }
  cce::status loss_and_grad(const cce::problem<T>& p, const cce::forward_outputs& out, const cce::gradients<T>& grads,
                            void* saved, std::size_t saved_size, void* ws, std::size_t ws_size) const {
    return op.loss_and_grad(p, out, grads, saved, saved_size, ws, ws_size, stream);
  }
};

forward_result forward_cuda(const at::Tensor& e, const at::Tensor& c, const at::Tensor& targets,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& b, at::IntArrayRef io,
                            at::ArrayRef<double> fo, std::int64_t outputs, std::int64_t saved_bytes) {
  const c10::cuda::CUDAGuard guard(c.device());
  return forward<cuda_exec>(e, c, targets, bias, weight, a, b, io, fo, outputs, saved_bytes);
}

backward_result backward_cuda(const at::Tensor& grad_loss, const at::Tensor& e, const at::Tensor& c,
                              const at::Tensor& targets, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& a,
                              const std::optional<at::Tensor>& b, const at::Tensor& saved, at::IntArrayRef io,
                              at::ArrayRef<double> fo, std::array<bool, grad_count> needs) {
  const c10::cuda::CUDAGuard guard(c.device());
  return backward<cuda_exec>(grad_loss, e, c, targets, bias, weight, a, b, saved, io, fo, needs);
}

loss_and_grad_result loss_and_grad_cuda(const at::Tensor& e, const at::Tensor& c, const at::Tensor& targets,
                                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& b,
                                        at::IntArrayRef io, at::ArrayRef<double> fo,
                                        std::array<bool, grad_count> needs) {
  const c10::cuda::CUDAGuard guard(c.device());
  return loss_and_grad<cuda_exec>(e, c, targets, bias, weight, a, b, io, fo, needs);
}

}  // namespace

TORCH_LIBRARY_IMPL(cce, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("backward", &backward_cuda);
  m.impl("loss_and_grad", &loss_and_grad_cuda);
}

}  // namespace cce_torch
