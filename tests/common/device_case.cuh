// One case's buffers on the device: inputs mirrored from a host_problem, the saved and workspace buffers of the
// plan, every forward output and every gradient. Calls can be enqueued on any stream any number of times (or
// captured in a CUDA graph: nothing here allocates once constructed); `reset` poisons the outputs with NaN first,
// so an element left unwritten fails the comparison.
#pragma once

#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include <cce/cce.cuh>
#include "case_check.hpp"
#include "device_problem.hpp"
#include "launch.hpp"

namespace cce::test {

template <class G>
std::vector<G> prefill_as(std::size_t count, std::uint64_t seed) {
  const std::vector<float> pre = make_prefill(count, seed);
  std::vector<G> v(count);
  for (std::size_t i = 0; i < count; ++i) v[i] = detail::from_float<G>(pre[i]);
  return v;
}

template <class T, class G, class Tile = tile::default_policy_t<T>>
class device_case {
 public:
  // `budget` as in workspace_bytes (0: the mode's default); the upstream gradient is make_grad_loss(cfg).
  // `edit` changes the device problem before the sizes are queried (e.g. pointers a test wants there).
  device_case(const host_problem<T>& h, std::size_t budget, const std::function<void(problem<T>&)>& edit = {})
      : cfg_(h.cfg),
        op_(h.cfg.opts),
        dp_(h),
        n_(std::size_t(h.cfg.n)),
        loss_(h.cfg.opts.reduction == reduction::none ? n_ : 1),
        lse_(n_),
        entropy_(n_),
        logprob_(n_),
        correct_(n_),
        error_(1),
        filter_tiles_(2),
        grad_(make_grad_loss(h.cfg)),
        de_(n_ * std::size_t(h.cfg.d)),
        dc_(std::size_t(h.cfg.v * h.cfg.d)),
        dbias_(h.cfg.bias ? std::size_t(h.cfg.v) : 0),
        da_(std::size_t(h.cfg.rank * h.cfg.d)),
        db_(std::size_t(h.cfg.v * h.cfg.rank)) {
    if (edit) edit(dp_.p);
    device_info dev;
    REQUIRE(current_device(dev) == status::success);
    saved_bytes_ = op_.saved_bytes(dp_.p);
    ws_bytes_ = op_.workspace_bytes(dp_.p, dev, budget);
    saved_ = std::make_unique<device_vector<unsigned char>>(saved_bytes_);
    ws_ = std::make_unique<device_vector<unsigned char>>(ws_bytes_);
    if (cfg_.opts.accumulate) {
      const device_vector<G>* grads[] = {&de_, &dc_, &dbias_, &da_, &db_};
      for (int i = 0; i < 5; ++i)
        prefill_[i] = std::make_unique<device_vector<G>>(prefill_as<G>(grads[i]->count, cfg_.seed + 1 + i));
    }
  }

  const linear_cross_entropy<T, Tile>& op() const { return op_; }
  const problem<T>& device_view() const { return dp_.p; }
  void* saved() const { return saved_->ptr; }
  void* workspace() const { return ws_->ptr; }
  std::size_t saved_bytes() const { return saved_bytes_; }
  std::size_t workspace_bytes() const { return ws_bytes_; }

  forward_outputs outputs() const {
    forward_outputs out;
    out.loss = loss_.ptr;
    out.lse = lse_.ptr;
    out.entropy = entropy_.ptr;
    out.target_logprob = logprob_.ptr;
    out.correct = cfg_.accuracy ? correct_.ptr : nullptr;
    out.error = error_.ptr;
    return out;
  }
  gradients<G> grads() const {
    gradients<G> g;
    g.de = de_.ptr;
    g.dc = dc_.ptr;
    g.dbias = dbias_.ptr;
    g.da = da_.ptr;
    g.db = db_.ptr;
    g.filter_tiles = filter_tiles_.ptr;
    return g;
  }

  // Outputs and gradients to NaN (0xff bytes, NaN in every element type), the error word to 0, and the
  // gradient buffers back to their prefill when the case accumulates.
  void reset(cudaStream_t s = nullptr) const {
    auto poison = [&](void* p, std::size_t bytes) {
      if (bytes) REQUIRE_CUDA(cudaMemsetAsync(p, 0xff, bytes, s));
    };
    poison(loss_.ptr, loss_.count * sizeof(float));
    poison(lse_.ptr, n_ * sizeof(float));
    poison(entropy_.ptr, n_ * sizeof(float));
    poison(logprob_.ptr, n_ * sizeof(float));
    poison(correct_.ptr, n_);
    REQUIRE_CUDA(cudaMemsetAsync(error_.ptr, 0, sizeof(int), s));
    const device_vector<G>* grads[] = {&de_, &dc_, &dbias_, &da_, &db_};
    for (int i = 0; i < 5; ++i) {
      if (!grads[i]->count) continue;
      if (cfg_.opts.accumulate) {
        REQUIRE_CUDA(cudaMemcpyAsync(grads[i]->ptr, prefill_[i]->ptr, grads[i]->count * sizeof(G),
                                         cudaMemcpyDeviceToDevice, s));
      } else {
        poison(grads[i]->ptr, grads[i]->count * sizeof(G));
      }
    }
  }

  status forward(cudaStream_t s = nullptr) const {
    return test::forward(op_, dp_.p, outputs(), saved_->ptr, saved_bytes_, ws_->ptr, ws_bytes_, s);
  }
  status backward(cudaStream_t s = nullptr) const {
    return test::backward(op_, dp_.p, loss_gradient{grad_.ptr}, grads(), saved_->ptr, saved_bytes_, ws_->ptr, ws_bytes_, s);
  }
  // Forward and backward with upstream gradient 1 in one call.
  status loss_and_grad(cudaStream_t s = nullptr) const {
    return test::loss_and_grad(op_, dp_.p, outputs(), grads(), saved_->ptr, saved_bytes_, ws_->ptr, ws_bytes_, s);
  }

  // Waits for the device and copies every output back.
  case_results results(bool with_backward = true) const {
    REQUIRE_CUDA(cudaDeviceSynchronize());
    case_results r;
    r.loss = loss_.download();
    r.lse = lse_.download();
    r.entropy = entropy_.download();
    r.target_logprob = logprob_.download();
    if (cfg_.accuracy) r.correct = correct_.download();
    r.error = error_.download()[0];
    if (with_backward) {
      r.de = to_float_vector(de_.download());
      r.dc = to_float_vector(dc_.download());
      r.dbias = to_float_vector(dbias_.download());
      r.da = to_float_vector(da_.download());
      r.db = to_float_vector(db_.download());
      const std::vector<std::int64_t> tiles = filter_tiles_.download();
      r.filter_tiles[0] = tiles[0];
      r.filter_tiles[1] = tiles[1];
    }
    return r;
  }

 private:
  case_config cfg_;
  linear_cross_entropy<T, Tile> op_;
  device_problem<T> dp_;
  std::size_t n_;
  device_vector<float> loss_, lse_, entropy_, logprob_;
  device_vector<std::uint8_t> correct_;
  device_vector<int> error_;
  device_vector<std::int64_t> filter_tiles_;
  device_vector<float> grad_;
  device_vector<G> de_, dc_, dbias_, da_, db_;
  std::unique_ptr<device_vector<G>> prefill_[5];  // what accumulating gradients start from
  std::size_t saved_bytes_ = 0, ws_bytes_ = 0;
  std::unique_ptr<device_vector<unsigned char>> saved_, ws_;
};

// Forward (every output) and backward (every gradient) on the default stream, results on the host.
template <class T, class G, class Tile = tile::default_policy_t<T>>
case_results run_device(const host_problem<T>& h, std::size_t budget, bool with_backward = true) {
  const device_case<T, G, Tile> dc(h, budget);
  dc.reset();
  REQUIRE(dc.forward() == status::success);
  if (with_backward) REQUIRE(dc.backward() == status::success);
  return dc.results(with_backward);
}

inline void check_bitwise_equal(const case_results& a, const case_results& b) {
  CHECK(bitwise_equal(a.loss, b.loss));
  CHECK(bitwise_equal(a.lse, b.lse));
  CHECK(bitwise_equal(a.entropy, b.entropy));
  CHECK(bitwise_equal(a.target_logprob, b.target_logprob));
  CHECK(a.correct == b.correct);
  CHECK(a.error == b.error);
  CHECK(bitwise_equal(a.de, b.de));
  CHECK(bitwise_equal(a.dc, b.dc));
  CHECK(bitwise_equal(a.dbias, b.dbias));
  CHECK(bitwise_equal(a.da, b.da));
  CHECK(bitwise_equal(a.db, b.db));
}

}  // namespace cce::test
