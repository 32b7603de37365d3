// The CPU tiled executor (the kernels' blockwise algorithm on the host) against the float64 reference on
// randomized shapes and options, in both backward operating points and with many tiles, splits and chunks.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <memory>
#include <random>

#include <cce/host/tiled_executor.hpp>
#include "../common/case_check.hpp"

namespace {

using namespace cce;

struct aligned_buffer {
  std::unique_ptr<void, decltype(&std::free)> ptr{nullptr, &std::free};
  explicit aligned_buffer(std::size_t bytes) {
    if (bytes) ptr.reset(std::aligned_alloc(256, (bytes + 255) / 256 * 256));
  }
  void* get() const { return ptr.get(); }
};

template <class T, class G>
test::case_results run_executor(const test::host_problem<T>& h, std::size_t budget, bool with_backward) {
  const test::case_config& cfg = h.cfg;
  const host::tiled_executor<T> ex(cfg.opts, 16, 16, device_info{80, 4});
  const problem<T> p = h.view();
  const std::size_t saved_bytes = ex.saved_bytes(p), ws_bytes = ex.workspace_bytes(p, budget);
  aligned_buffer saved(saved_bytes), ws(ws_bytes);

  test::case_results r;
  const bool none = cfg.opts.reduction == reduction::none;
  r.loss.assign(none ? std::size_t(cfg.n) : 1, -7.f);  // poisoned: every element must be written
  r.lse.assign(std::size_t(cfg.n), -7.f);
  r.entropy.assign(std::size_t(cfg.n), -7.f);
  r.target_logprob.assign(std::size_t(cfg.n), -7.f);
  r.correct.assign(std::size_t(cfg.n), 7);
  forward_outputs out;
  out.loss = r.loss.data();
  out.lse = r.lse.data();
  out.entropy = r.entropy.data();
  out.target_logprob = r.target_logprob.data();
  out.correct = r.correct.data();
  out.error = &r.error;
  REQUIRE(ex.forward(p, out, saved.get(), saved_bytes, ws.get(), ws_bytes) == status::success);
  if (!with_backward) return r;

  const std::vector<float> grad = test::make_grad_loss(cfg);
  std::vector<G> de, dc, dbias, da, db;
  auto prefill = [&](std::vector<G>& v, std::size_t count, std::uint64_t salt) {
    const std::vector<float> pre = test::make_prefill(count, cfg.seed + salt);
    v.resize(count);
    for (std::size_t i = 0; i < count; ++i) v[i] = cfg.opts.accumulate ? detail::from_float<G>(pre[i]) : detail::from_float<G>(-7.f);
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
void run_case(const test::host_problem<T>& h, std::size_t budget,
              test::gradient_check mode = test::gradient_check::bound) {
  const test::case_results r = run_executor<T, G>(h, budget, true);
  test::check_case<T, G>(h, r, true, mode);
}

}  // namespace

TEST_CASE("tiled executor matches the float64 reference on randomized cases", "[executor]") {
  std::mt19937_64 rng(20261125);
  for (int i = 0; i < 1200; ++i) {
    test::case_config cfg = test::random_config(rng, 40, 40, 80);
    // Budgets: the default (chunked), the smallest plan (minimal: 16-row blocks, 16-class chunks) and between.
    const std::size_t budget = i % 3 == 0 ? 0 : i % 3 == 1 ? 1 : 24 * 1024;
    switch (i % 4) {
      case 0: run_case<__nv_bfloat16, __nv_bfloat16>(test::make_problem<__nv_bfloat16>(cfg), budget); break;
      case 1: run_case<__nv_bfloat16, float>(test::make_problem<__nv_bfloat16>(cfg), budget); break;
      case 2: run_case<__half, __half>(test::make_problem<__half>(cfg), budget); break;
      default: run_case<float, float>(test::make_problem<float>(cfg), budget); break;
    }
  }
}

TEST_CASE("tiled executor: both operating points give the same gradients", "[executor]") {
  test::case_config cfg;
  cfg.n = 70;
  cfg.d = 24;
  cfg.v = 90;
  cfg.bias = true;
  cfg.opts = options::exact();
  const auto h = test::make_problem<float>(cfg);
  const host::tiled_executor<float> ex(cfg.opts, 16, 16, device_info{80, 4});
  const problem<float> p = h.view();
  REQUIRE(ex.plan_for(p, ex.workspace_bytes(p, 0)).mode == backward_mode::chunked);
  REQUIRE(ex.plan_for(p, ex.workspace_bytes(p, 1)).mode == backward_mode::minimal);
  const auto chunked = run_executor<float, float>(h, 0, true);
  const auto minimal = run_executor<float, float>(h, 1, true);
  CHECK(test::relative_l2(minimal.de, chunked.de) < 1e-6);
  CHECK(test::relative_l2(minimal.dc, chunked.dc) < 1e-6);
  CHECK(test::relative_l2(minimal.dbias, chunked.dbias) < 1e-6);
}

TEST_CASE("tiled executor: the design's relative tolerances on every data regime", "[executor]") {
  for (auto data : {test::regime::lm_like, test::regime::uniform, test::regime::peaked}) {
    for (bool exact : {true, false}) {
      test::case_config cfg;
      cfg.n = 72;
      cfg.d = 48;
      cfg.v = 300;
      cfg.data = data;
      cfg.seed = 11 + int(data);
      cfg.opts = exact ? options::exact() : options{};
      const auto h = test::make_problem<__nv_bfloat16>(cfg);
      run_case<__nv_bfloat16, __nv_bfloat16>(h, 0, test::gradient_check::relative);
      run_case<__nv_bfloat16, __nv_bfloat16>(h, 1, test::gradient_check::relative);
    }
  }
}

TEST_CASE("tiled executor: low-rank head of rank 1 and 16", "[executor]") {
  for (std::int64_t rank : {1, 16}) {
    test::case_config cfg;
    cfg.n = 50;
    cfg.d = 40;
    cfg.v = 120;
    cfg.rank = rank;
    cfg.bias = true;
    cfg.seed = std::uint64_t(rank);
    cfg.opts = options::exact();
    const auto h = test::make_problem<__nv_bfloat16>(cfg);
    run_case<__nv_bfloat16, __nv_bfloat16>(h, 0, test::gradient_check::relative);
    run_case<__nv_bfloat16, float>(h, 1, test::gradient_check::relative);
  }
}
