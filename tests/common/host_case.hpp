// Runs one case on the CPU tiled executor: forward with every output, then backward with every gradient, into
// poisoned (or, with options::accumulate, prefilled) host buffers, so that an element left unwritten fails.
#pragma once

#include <catch2/catch.hpp>

#include <cstdlib>
#include <memory>

#include <cce/host/tiled_executor.hpp>
#include "case_check.hpp"

namespace cce::test {

// 256-byte aligned host memory, as the executor's buffer checks require.
struct aligned_buffer {
  std::unique_ptr<void, decltype(&std::free)> ptr{nullptr, &std::free};
  explicit aligned_buffer(std::size_t bytes) {
    if (bytes) ptr.reset(std::aligned_alloc(256, (bytes + 255) / 256 * 256));
  }
  void* get() const { return ptr.get(); }
};

// `budget` as in workspace_bytes; 16 x 16 tiles so that small problems span several tiles, splits and chunks.
// `p` is the problem to run, h.view() unless a test changes what the view holds.
template <class T, class G>
case_results run_executor(const host_problem<T>& h, const problem<T>& p, std::size_t budget, bool with_backward) {
  const case_config& cfg = h.cfg;
  const host::tiled_executor<T> ex(cfg.opts, 16, 16, device_info{80, 4});
  const std::size_t saved_bytes = ex.saved_bytes(p), ws_bytes = ex.workspace_bytes(p, budget);
  aligned_buffer saved(saved_bytes), ws(ws_bytes);

  case_results r;
  const bool none = cfg.opts.reduction == reduction::none;
  r.loss.assign(none ? std::size_t(cfg.n) : 1, -7.f);  // poisoned: every element must be written
  r.lse.assign(std::size_t(cfg.n), -7.f);
  r.entropy.assign(std::size_t(cfg.n), -7.f);
  r.target_logprob.assign(std::size_t(cfg.n), -7.f);
  if (cfg.accuracy) r.correct.assign(std::size_t(cfg.n), 7);
  forward_outputs out;
  out.loss = r.loss.data();
  out.lse = r.lse.data();
  out.entropy = r.entropy.data();
  out.target_logprob = r.target_logprob.data();
  out.correct = cfg.accuracy ? r.correct.data() : nullptr;
  out.error = &r.error;
  REQUIRE(ex.forward(p, out, saved.get(), saved_bytes, ws.get(), ws_bytes) == status::success);
  if (!with_backward) return r;

  const std::vector<float> grad = make_grad_loss(cfg);
  std::vector<G> de, dc, dbias, da, db;
  auto prefill = [&](std::vector<G>& v, std::size_t count, std::uint64_t salt) {
    const std::vector<float> pre = make_prefill(count, cfg.seed + salt);
    v.resize(count);
    for (std::size_t i = 0; i < count; ++i)
      v[i] = cfg.opts.accumulate ? detail::from_float<G>(pre[i]) : detail::from_float<G>(-7.f);
  };
  prefill(de, std::size_t(cfg.n * cfg.d), 1);
  prefill(dc, std::size_t(cfg.v * cfg.d), 2);
  if (cfg.bias) prefill(dbias, std::size_t(cfg.v), 3);
  if (cfg.rank) {
    prefill(da, std::size_t(cfg.rank * cfg.d), 4);
    prefill(db, std::size_t(cfg.v * cfg.rank), 5);
  }
  gradients<G> g;
  g.de = de.data();
  g.dc = dc.data();
  g.dbias = cfg.bias ? dbias.data() : nullptr;
  g.da = cfg.rank ? da.data() : nullptr;
  g.db = cfg.rank ? db.data() : nullptr;
  g.filter_tiles = r.filter_tiles;
  REQUIRE(ex.backward(p, loss_gradient{grad.data()}, g, saved.get(), saved_bytes, ws.get(), ws_bytes) ==
          status::success);
  auto to_f = [](const std::vector<G>& v) {
    std::vector<float> f;
    for (const G& x : v) f.push_back(detail::to_float(x));
    return f;
  };
  r.de = to_f(de);
  r.dc = to_f(dc);
  r.dbias = to_f(dbias);
  r.da = to_f(da);
  r.db = to_f(db);
  return r;
}

template <class T, class G>
case_results run_executor(const host_problem<T>& h, std::size_t budget, bool with_backward) {
  return run_executor<T, G>(h, h.view(), budget, with_backward);
}

}  // namespace cce::test
