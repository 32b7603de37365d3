// cce::linear_cross_entropy<T, Tile>: the fused linear layer + softmax cross-entropy of docs/api.md.
//
//   cce::linear_cross_entropy<__nv_bfloat16> op{opts};
//   size_t saved = op.saved_bytes(prob), work = op.workspace_bytes(prob, dev, budget);
//   op.forward(prob, outputs, d_saved, saved, d_work, work, stream);
//   op.backward(prob, {d_grad_loss}, grads, d_saved, saved, d_work, work, stream);
//
// With a vocabulary-parallel classifier, forward is replaced by shard_forward + combine (docs/vocab-parallel.md).
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
#include <cce/epilogue/shard_stats.hpp>
#include <cce/options.hpp>
#include <cce/problem.hpp>
#include <cce/status.hpp>
#include <cce/tile/default_policy.hpp>
#include <cce/vocab_shard.hpp>

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

  // The backward operating point a workspace of `budget` bytes gives: loss_and_grad when that call keeps logits.
  backward_mode mode(const problem<T>& p, const device_info& dev, std::size_t budget) const {
    const detail::plan pl = plan(p, dev, budget);
    return keeps_logits(p, pl, dev) ? backward_mode::loss_and_grad : pl.mode;
  }

  [[nodiscard]] status forward(const problem<T>& p, const forward_outputs& out, void* saved, std::size_t saved_size,
                               void* workspace, std::size_t workspace_size, cudaStream_t stream = nullptr) const {
    CCE_TRY(detail::validate_problem(p, opts_));
    if (out.loss == nullptr && (opts_.reduction != reduction::none || p.n > 0)) return status::null_pointer;
    if (p.v != p.total_classes()) return status::invalid_option;  // a vocabulary shard: shard_forward + combine
    detail::plan pl;
    device_info dev;
    CCE_TRY(prepare_forward(p, saved, saved_size, workspace, workspace_size, pl, dev));
    const detail::portable_path<T, Tile> path(p, opts_, pl, detail::vectorizable(p),
                                              detail::sm90::available(p, pl, dev, opts_));
    return path.forward(out, pl.carve_saved(saved), pl.template carve_forward<T>(workspace), stream);
  }

  // Vocabulary parallelism (docs/vocab-parallel.md): each rank's problem holds the classes named by p.shard and
  // runs shard_forward, an all-gather of the statistics, combine, then backward as usual.

  // Bytes of one shard's statistics: the same on every rank (it depends on N only).
  std::size_t shard_stats_bytes(const problem<T>& p) const { return detail::shard_stats_bytes(p.n); }

  // Per-row statistics of this shard's classes into `stats`; the gradient filter's statistics into `saved`.
  [[nodiscard]] status shard_forward(const problem<T>& p, void* stats, std::size_t stats_size, void* saved,
                                     std::size_t saved_size, void* workspace, std::size_t workspace_size,
                                     cudaStream_t stream = nullptr) const {
    CCE_TRY(detail::validate_problem(p, opts_));
    CCE_TRY(detail::validate_buffer(stats, stats_size, shard_stats_bytes(p)));
    detail::plan pl;
    device_info dev;
    CCE_TRY(prepare_forward(p, saved, saved_size, workspace, workspace_size, pl, dev));
    const detail::portable_path<T, Tile> path(p, opts_, pl, detail::vectorizable(p),
                                              detail::sm90::available(p, pl, dev, opts_));
    return path.shard_forward(stats, pl.carve_saved(saved), pl.template carve_forward<T>(workspace), stream);
  }

  // From every shard's gathered statistics: the loss and per-row outputs of the whole vocabulary (identical on
  // every rank) and, in `saved`, the state this shard's backward reads. `saved` is the buffer shard_forward filled.
  [[nodiscard]] status combine(const problem<T>& p, const gathered_stats& gathered, const forward_outputs& out,
                               void* saved, std::size_t saved_size, void* workspace, std::size_t workspace_size,
                               cudaStream_t stream = nullptr) const {
    CCE_TRY(detail::validate_problem(p, opts_));
    if (out.loss == nullptr || gathered.data == nullptr) return status::null_pointer;
    detail::shard_rows rows;
    CCE_TRY(detail::make_shard_order(gathered, p.total_classes(), rows.order));
    rows.stride = shard_stats_bytes(p);
    rows.data = static_cast<const unsigned char*>(gathered.data);
    if (gathered.bytes < rows.stride * std::size_t(gathered.ranks)) return status::workspace_too_small;
    if (!detail::aligned_to(gathered.data, 16)) return status::misaligned_pointer;
    detail::plan pl;
    device_info dev;
    CCE_TRY(prepare_forward(p, saved, saved_size, workspace, workspace_size, pl, dev));
    const detail::portable_path<T, Tile> path(p, opts_, pl, detail::vectorizable(p),
                                              detail::sm90::available(p, pl, dev, opts_));
    return path.combine(rows, out, pl.carve_saved(saved), pl.template carve_forward<T>(workspace), stream);
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
    const detail::portable_path<T, Tile> path(p, opts_, pl, detail::vectorizable(p),
                                              detail::sm90::available(p, pl, dev, opts_));
    return path.backward(grad, grads, pl.carve_saved(const_cast<void*>(saved)),
                         pl.template carve_backward<T>(workspace), stream);
  }

  // Forward, then the gradients of the loss itself (upstream gradient 1), in one call. With
  // options::backward_mode = loss_and_grad on the sm_90a path it keeps the logits of row blocks instead of
  // recomputing them (three GEMM-equivalents, docs/api.md).
  template <class G>
  [[nodiscard]] status loss_and_grad(const problem<T>& p, const forward_outputs& out, const gradients<G>& grads,
                                     void* saved, std::size_t saved_size, void* workspace,
                                     std::size_t workspace_size, cudaStream_t stream = nullptr) const {
    static_assert(std::is_same_v<G, T> || std::is_same_v<G, float>, "gradients are T or float");
    CCE_TRY(detail::validate_problem(p, opts_));
    device_info dev;
    CCE_TRY(current_device(dev));
    CCE_TRY(can_implement(p, dev));
    const detail::plan pl = plan(p, dev, workspace_size);
    if (!keeps_logits(p, pl, dev)) {
      CCE_TRY(forward(p, out, saved, saved_size, workspace, workspace_size, stream));
      return backward(p, loss_gradient{}, grads, saved, saved_size, workspace, workspace_size, stream);
    }
    if (out.loss == nullptr && (opts_.reduction != reduction::none || p.n > 0)) return status::null_pointer;
    CCE_TRY(detail::validate_gradients(p, grads));
    std::size_t need = 0;
    pl.template carve_kept<T>(nullptr, &need);
    CCE_TRY(detail::validate_buffer(saved, saved_size, pl.saved_bytes()));
    CCE_TRY(detail::validate_buffer(workspace, workspace_size, need));
    const detail::portable_path<T, Tile> path(p, opts_, pl, detail::vectorizable(p), true);
    return path.loss_and_grad(out, grads, pl.carve_saved(saved), pl.template carve_kept<T>(workspace), stream);
  }

 private:
  options opts_;

  // The checks and plan every forward step shares, after the problem's own checks.
  status prepare_forward(const problem<T>& p, const void* saved, std::size_t saved_size, const void* workspace,
                         std::size_t workspace_size, detail::plan& pl, device_info& dev) const {
    CCE_TRY(current_device(dev));
    CCE_TRY(can_implement(p, dev));
    pl = plan(p, dev, workspace_size);
    std::size_t need = 0;
    pl.template carve_forward<T>(nullptr, &need);
    CCE_TRY(detail::validate_buffer(saved, saved_size, pl.saved_bytes()));
    return detail::validate_buffer(workspace, workspace_size, need);
  }

  // Whether loss_and_grad keeps logit blocks: planned, and the sm_90a forward (which writes them) takes the problem.
  bool keeps_logits(const problem<T>& p, const detail::plan& pl, const device_info& dev) const {
    return pl.kept_rows > 0 && p.v == p.total_classes() && detail::sm90::available(p, pl, dev, opts_);
  }

  detail::plan plan(const problem<T>& p, const device_info& dev, std::size_t budget) const {
    return detail::make_plan<T>(p.n, p.d, p.v, p.lora.rank, p.bias != nullptr, opts_, Tile::bm, Tile::bn, dev,
                                budget, p.class_weights != nullptr,
                                opts_.vocab_sort ? detail::sort_temp_bytes(p.v) : 0, Tile::forward_ctas_per_sm);
  }
};

}  // namespace cce
