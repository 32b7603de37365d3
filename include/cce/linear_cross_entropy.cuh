// cce::linear_cross_entropy<T, Tile>: the fused linear layer + softmax cross-entropy of docs/api.md.
//
//   cce::linear_cross_entropy<__nv_bfloat16> op{opts};
//   size_t saved = op.saved_bytes(prob), work = op.workspace_bytes(prob, dev, budget);
//   op.forward(prob, outputs, d_saved, saved, d_work, work, stream);
//   op.backward(prob, {d_grad_loss}, grads, d_saved, saved, d_work, work, stream);
//
// Every call validates its arguments on the host first, then only enqueues work on `stream`: it allocates
// nothing, never synchronises and can be captured in a CUDA graph. The workspace size the caller grants is the
// budget that picks the backward's operating point; pass the same size that workspace_bytes returned.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <type_traits>

#include <cce/detail/element_type.hpp>
#include <cce/detail/validate.hpp>
#include <cce/device.hpp>
#include <cce/dispatch/plan.hpp>
#include <cce/dispatch/portable.cuh>
#include <cce/options.hpp>
#include <cce/problem.hpp>
#include <cce/status.hpp>
#include <cce/tile/default_policy.hpp>

namespace cce {

template <class T, class Tile = tile::default_policy_t<T>>
class linear_cross_entropy {
  static_assert(detail::is_supported_element_v<T>, "T is float, __half or __nv_bfloat16");

 public:
  using element_type = T;
  using tile_policy = Tile;

  explicit linear_cross_entropy(const options& opts = {}) : opts_(opts) {}
  const options& opts() const { return opts_; }

  // Host-only: can this problem run with these options on this device?
  status can_implement(const problem<T>& p, const device_info& dev) const {
    if (dev.arch < 80) return status::unsupported_arch;
    return detail::validate_problem(p, opts_);
  }

  // Bytes of the buffer that carries state from forward to backward.
  std::size_t saved_bytes(const problem<T>& p) const { return plan(p, {}, 0).saved_bytes(); }

  // Bytes of scratch for forward, backward and loss_and_grad; `budget` (0: the mode's default) selects the
  // backward operating point (docs/api.md).
  std::size_t workspace_bytes(const problem<T>& p, const device_info& dev, std::size_t budget = 0) const {
    return plan(p, dev, budget).template workspace_bytes<T>();
  }

  // The backward operating point a workspace of `budget` bytes gives.
  backward_mode mode(const problem<T>& p, const device_info& dev, std::size_t budget) const {
    return plan(p, dev, budget).mode;
  }

  [[nodiscard]] status forward(const problem<T>& p, const forward_outputs& out, void* saved, std::size_t saved_size,
                               void* workspace, std::size_t workspace_size, cudaStream_t stream = nullptr) const {
    CCE_TRY(detail::validate_problem(p, opts_));
    if (out.loss == nullptr && (opts_.reduction != reduction::none || p.n > 0)) return status::null_pointer;
    device_info dev;
    CCE_TRY(current_device(dev));
    CCE_TRY(can_implement(p, dev));
    const detail::plan pl = plan(p, dev, workspace_size);
    std::size_t need = 0;
    pl.template carve_forward<T>(nullptr, &need);
    CCE_TRY(detail::validate_buffer(saved, saved_size, pl.saved_bytes()));
    CCE_TRY(detail::validate_buffer(workspace, workspace_size, need));
    const detail::portable_path<T, Tile> path(p, opts_, pl, detail::vectorizable(p));
    return path.forward(out, pl.carve_saved(saved), pl.template carve_forward<T>(workspace), stream);
  }

  // Gradients G are T or float; each non-null pointer in `grads` is written (or added to, with
  // options::accumulate). `grad` is the upstream gradient of the loss (null: 1).
  template <class G>
  [[nodiscard]] status backward(const problem<T>& p, loss_gradient grad, const gradients<G>& grads,
                                const void* saved, std::size_t saved_size, void* workspace,
                                std::size_t workspace_size, cudaStream_t stream = nullptr) const {
    static_assert(std::is_same_v<G, T> || std::is_same_v<G, float>, "gradients are T or float");
    CCE_TRY(detail::validate_problem(p, opts_));
    CCE_TRY(detail::validate_gradients(p, grads));
    device_info dev;
    CCE_TRY(current_device(dev));
    CCE_TRY(can_implement(p, dev));
    const detail::plan pl = plan(p, dev, workspace_size);
    std::size_t need = 0;
    pl.template carve_backward<T>(nullptr, &need);
    CCE_TRY(detail::validate_buffer(saved, saved_size, pl.saved_bytes()));
    CCE_TRY(detail::validate_buffer(workspace, workspace_size, need));
    const detail::portable_path<T, Tile> path(p, opts_, pl, detail::vectorizable(p));
    return path.backward(grad, grads, pl.carve_saved(const_cast<void*>(saved)),
                         pl.template carve_backward<T>(workspace), stream);
  }

  // Forward, then the gradients of the loss itself (upstream gradient 1), in one call.
  template <class G>
  [[nodiscard]] status loss_and_grad(const problem<T>& p, const forward_outputs& out, const gradients<G>& grads,
                                     void* saved, std::size_t saved_size, void* workspace,
                                     std::size_t workspace_size, cudaStream_t stream = nullptr) const {
    CCE_TRY(forward(p, out, saved, saved_size, workspace, workspace_size, stream));
    return backward(p, loss_gradient{}, grads, saved, saved_size, workspace, workspace_size, stream);
  }

 private:
  options opts_;

  detail::plan plan(const problem<T>& p, const device_info& dev, std::size_t budget) const {
    return detail::make_plan<T>(p.n, p.d, p.v, p.lora.rank, p.bias != nullptr, opts_, Tile::bm, Tile::bn, dev,
                                budget);
  }
};

}  // namespace cce
