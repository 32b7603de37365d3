// launch.hpp's functions for one element type: tests/CMakeLists.txt compiles this file once per type with
// CCE_TEST_BF16, CCE_TEST_HALF or CCE_TEST_FLOAT defined, so the three build in parallel.
#include "launch.hpp"

namespace cce::test {

template <class T, class Tile>
status forward(const linear_cross_entropy<T, Tile>& op, const problem<T>& p, const forward_outputs& out, void* saved,
               std::size_t saved_size, void* workspace, std::size_t workspace_size, cudaStream_t stream) {
  return op.forward(p, out, saved, saved_size, workspace, workspace_size, stream);
}

template <class T, class G, class Tile>
status backward(const linear_cross_entropy<T, Tile>& op, const problem<T>& p, loss_gradient grad,
                const gradients<G>& grads, const void* saved, std::size_t saved_size, void* workspace,
                std::size_t workspace_size, cudaStream_t stream) {
  return op.backward(p, grad, grads, saved, saved_size, workspace, workspace_size, stream);
}

template <class T, class G, class Tile>
status loss_and_grad(const linear_cross_entropy<T, Tile>& op, const problem<T>& p, const forward_outputs& out,
                     const gradients<G>& grads, void* saved, std::size_t saved_size, void* workspace,
                     std::size_t workspace_size, cudaStream_t stream) {
  return op.loss_and_grad(p, out, grads, saved, saved_size, workspace, workspace_size, stream);
}

template <class T, class Tile>
status shard_forward(const linear_cross_entropy<T, Tile>& op, const problem<T>& p, void* stats, std::size_t stats_size,
                     void* saved, std::size_t saved_size, void* workspace, std::size_t workspace_size,
                     cudaStream_t stream) {
  return op.shard_forward(p, stats, stats_size, saved, saved_size, workspace, workspace_size, stream);
}

template <class T, class Tile>
status combine(const linear_cross_entropy<T, Tile>& op, const problem<T>& p, const gathered_stats& gathered,
               const forward_outputs& out, void* saved, std::size_t saved_size, void* workspace,
               std::size_t workspace_size, cudaStream_t stream) {
  return op.combine(p, gathered, out, saved, saved_size, workspace, workspace_size, stream);
}

#if defined(CCE_TEST_BF16)
using element = __nv_bfloat16;
#elif defined(CCE_TEST_HALF)
using element = __half;
#elif defined(CCE_TEST_FLOAT)
using element = float;
#else
#error "define CCE_TEST_BF16, CCE_TEST_HALF or CCE_TEST_FLOAT"
#endif

using op_type = linear_cross_entropy<element>;

template status forward(const op_type&, const problem<element>&, const forward_outputs&, void*, std::size_t, void*,
                        std::size_t, cudaStream_t);
template status shard_forward(const op_type&, const problem<element>&, void*, std::size_t, void*, std::size_t, void*,
                              std::size_t, cudaStream_t);
template status combine(const op_type&, const problem<element>&, const gathered_stats&, const forward_outputs&, void*,
                        std::size_t, void*, std::size_t, cudaStream_t);

// Gradients in the element type and in float (one and the same for float).
#define CCE_TEST_GRADIENTS(G)                                                                                         \
  template status backward(const op_type&, const problem<element>&, loss_gradient, const gradients<G>&, const void*,  \
                           std::size_t, void*, std::size_t, cudaStream_t);                                            \
  template status loss_and_grad(const op_type&, const problem<element>&, const forward_outputs&, const gradients<G>&, \
                                void*, std::size_t, void*, std::size_t, cudaStream_t);
CCE_TEST_GRADIENTS(float)
#if !defined(CCE_TEST_FLOAT)
CCE_TEST_GRADIENTS(element)
#endif
#undef CCE_TEST_GRADIENTS

#if defined(CCE_TEST_BF16)
cudaFuncAttributes portable_forward_attributes() {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, detail::forward_kernel<element, tile::default_policy_t<element>, true>) !=
      cudaSuccess) {
    cudaGetLastError();
  }
  return attr;
}

std::vector<std::size_t> sm90_local_bytes() {
  using bf16 = __nv_bfloat16;
  device_info dev;
  if (current_device(dev) != status::success || dev.arch != 90 ||
      !detail::sm90::has_sm90a_image(detail::sm90::forward_kernel<bf16>)) {
    return {};
  }
  const auto local_bytes = [](auto kernel) {
    cudaFuncAttributes attr{};
    return cudaFuncGetAttributes(&attr, kernel) == cudaSuccess ? attr.localSizeBytes : ~std::size_t(0);
  };
  return {local_bytes(detail::sm90::forward_kernel<bf16>),
          local_bytes(detail::sm90::forward_kernel<bf16, false, true>),
          local_bytes(detail::sm90::dlogit_kernel<bf16>),
          local_bytes(detail::sm90::grad_gemm_kernel<bf16, bf16, detail::major::k>),
          local_bytes(detail::sm90::grad_gemm_kernel<bf16, float, detail::major::mn>),
          local_bytes(detail::sm90::grad_gemm_persistent_kernel<bf16, bf16>),
          local_bytes(detail::sm90::grad_gemm_persistent_kernel<bf16, float>)};
}
#endif

}  // namespace cce::test
