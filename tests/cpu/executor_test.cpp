// The CPU tiled executor (the kernels' blockwise algorithm on the host) against the float64 reference on
// randomized shapes and options, in both backward operating points and with many tiles, splits and chunks.
#include <catch2/catch.hpp>

#include <random>

#include "../common/host_case.hpp"
#include "../common/split_budget_check.hpp"

namespace {

using namespace cce;
using test::run_executor;

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
    cfg.index = i;
    if (!test::case_selected(i)) continue;
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

TEST_CASE("tiled executor: minimal's passes take their own blocks, with or without carries", "[executor][plan]") {
  test::case_config cfg;
  cfg.n = 300;
  cfg.d = 24;
  cfg.v = 700;
  cfg.bias = true;
  cfg.opts = options::exact();
  cfg.opts.backward_mode = backward_mode::minimal;
  cfg.opts.accumulate = true;  // the two passes (the carried pass overwrites dC)
  const auto h = test::make_problem<float>(cfg);
  const host::tiled_executor<float> ex(cfg.opts, 16, 16, device_info{80, 4});
  const problem<float> p = h.view();
  test::case_config chunked_cfg = cfg;  // the same data
  chunked_cfg.opts.backward_mode = backward_mode::chunked;
  const auto chunked = run_executor<float, float>(test::make_problem<float>(chunked_cfg), 0, true);
  // Every budget from the smallest plan to one that holds everything: each distinct pair of pass shapes once.
  int de_carried = 0, dc_carried = 0, dc_whole = 0, different = 0, plans = 0;
  detail::pass_shape last_de{}, last_dc{};
  for (std::size_t budget = 1; budget < (std::size_t(256) << 10); budget += 1024) {
    const detail::plan pl = ex.plan_for(p, ex.workspace_bytes(p, budget));
    if (pl.mode != backward_mode::minimal) continue;
    if (pl.de_pass == last_de && pl.dc_pass == last_dc) continue;
    last_de = pl.de_pass;
    last_dc = pl.dc_pass;
    ++plans;
    de_carried += pl.chunks(pl.de_pass) > 1;
    dc_carried += pl.row_blocks(pl.dc_pass) > 1;
    dc_whole += pl.row_blocks(pl.dc_pass) == 1;
    different += !(pl.de_pass == pl.dc_pass);
    INFO("dE pass " << pl.de_pass.rows << " x " << pl.de_pass.cols << ", dC pass " << pl.dc_pass.rows << " x "
                    << pl.dc_pass.cols);
    const auto minimal = run_executor<float, float>(h, budget, true);
    CHECK(test::relative_l2(minimal.de, chunked.de) < 1e-6);
    CHECK(test::relative_l2(minimal.dc, chunked.dc) < 1e-6);
    CHECK(test::relative_l2(minimal.dbias, chunked.dbias) < 1e-6);
  }
  CHECK(plans >= 3);
  CHECK(de_carried > 0);
  CHECK(dc_carried > 0);
  CHECK(dc_whole > 0);
  CHECK(different > 0);
}

namespace {

// Minimal's carried pass (dispatch/plan.hpp): dE's carry (and its compensation) in dC's buffer, the chunks under
// it walked last, all but the last recomputed for dC. Returns whether `budget` plans it, in a shape other than `last`;
// then checks it against the reference and, for fp32 gradients, against chunked's, and that a call which accumulates,
// or a strided or misaligned dC, takes the two passes instead.
template <class T, class G>
bool check_carried_pass(const test::case_config& cfg, std::size_t budget, detail::pass_shape& last,
                        test::gradient_check mode) {
  const auto h = test::make_problem<T>(cfg);
  const host::tiled_executor<T> ex(cfg.opts, 16, 16, device_info{80, 4});
  const problem<T> p = h.view();
  const detail::plan pl = ex.plan_for(p, ex.workspace_bytes(p, budget));
  if (pl.mode != backward_mode::minimal || pl.carried_pass.cols == 0 || pl.carried_pass == last) return false;
  last = pl.carried_pass;
  INFO("budget " << budget << ": carried pass " << pl.carried_pass.rows << " x " << pl.carried_pass.cols << ", "
                 << pl.chunks_under_carry << " of " << pl.chunks(pl.carried_pass) << " chunks under the carry");
  CHECK(pl.chunks_under_carry > 0);
  CHECK(4 * pl.chunks_under_carry <= 3 * pl.chunks(pl.carried_pass));
  alignas(16) static float dc[4];
  CHECK(pl.carries_in_dc(true, dc, cfg.d));
  CHECK_FALSE(pl.carries_in_dc(false, dc, cfg.d));     // no dE: nothing to carry
  CHECK_FALSE(pl.carries_in_dc(true, dc, cfg.d + 8));  // strided dC: its gaps are not the library's
  CHECK_FALSE(pl.carries_in_dc(true, dc + 1, cfg.d));  // not aligned for the products' vector stores
  options accumulating = cfg.opts;
  accumulating.accumulate = true;
  const host::tiled_executor<T> acc_ex(accumulating, 16, 16, device_info{80, 4});
  CHECK(acc_ex.plan_for(p, acc_ex.workspace_bytes(p, budget)).carried_pass.cols == 0);

  const test::case_results r = run_executor<T, G>(h, budget, true);
  test::check_case<T, G>(h, r, true, mode);
  test::case_config chunked = cfg;
  chunked.opts.backward_mode = backward_mode::chunked;
  const test::case_results c = run_executor<T, G>(test::make_problem<T>(chunked), 0, true);
  CHECK(r.filter_tiles[0] == c.filter_tiles[0]);
  CHECK(r.filter_tiles[1] == c.filter_tiles[1]);
  if (std::is_same_v<G, float>) {  // the same sums in another order of chunks
    CHECK(test::relative_l2(r.de, c.de) < 1e-6);
    CHECK(test::relative_l2(r.dc, c.dc) < 1e-6);
    CHECK(test::relative_l2(r.dbias, c.dbias) < 1e-6);
    CHECK(test::relative_l2(r.db, c.db) < 1e-6);
  }
  return true;
}

}  // namespace

// The size query's workspace, given back as the budget, plans a backward that fits it (the call plans from the size
// it is given): at every budget, for shapes whose smallest minimal blocks carry more than wider ones (D large
// against N and V), with the tiles and SM count of an H100.
TEST_CASE("plan: a workspace of the reported size holds the plan it gives", "[plan]") {
  options o;
  o.backward_mode = backward_mode::minimal;
  const device_info h100{90, 132};
  struct shape {
    std::int64_t n, d, v;
  };
  const shape shapes[] = {{200, 2048, 4007}, {515, 1032, 9007}, {1500, 128, 2000}, {8192, 4096, 128256}};
  for (const shape& s : shapes) {
    for (bool kahan : {false, true}) {
      o.accum = kahan ? accumulation::kahan : accumulation::fp32;
      for (std::size_t budget = std::size_t(64) << 10; budget <= (std::size_t(80) << 20); budget = budget * 9 / 8) {
        auto make = [&](std::size_t b) {  // with a bias, and without (then with the first-order baseline's buffers)
          return detail::make_plan<__nv_bfloat16>(s.n, s.d, s.v, 0, kahan, o, 128, 128, h100, b);
        };
        const std::size_t reported = make(budget).workspace_bytes<__nv_bfloat16>();
        const detail::plan again = make(reported);
        std::size_t need = 0;
        again.carve_backward<__nv_bfloat16>(nullptr, &need);
        INFO("n " << s.n << " d " << s.d << " v " << s.v << " kahan " << kahan << " budget " << budget);
        CHECK(need <= reported);
        CHECK(again.workspace_bytes<__nv_bfloat16>() <= reported);
      }
    }
  }
}

// Chunked takes the fewest equal chunks whose buffers fit the budget: one chunk fewer would not fit, and the chunks
// are equal but for their rounding to whole tiles of 128 classes (the last at most a tile a chunk narrower).
TEST_CASE("plan: chunked takes the fewest equal chunks that fit", "[plan]") {
  const device_info h100{90, 132};
  struct shape {
    std::int64_t n, d, v;
  };
  const shape shapes[] = {{8192, 4096, 128256}, {8192, 2304, 256000}, {8192, 5120, 131072}, {515, 1032, 9007}};
  int several = 0;
  for (const shape& s : shapes) {
    for (std::size_t budget = std::size_t(1) << 20; budget <= (std::size_t(1) << 30); budget *= 2) {
      const auto pl = detail::make_plan<__nv_bfloat16>(s.n, s.d, s.v, 0, false, options{}, 128, 128, h100, budget);
      if (pl.mode != backward_mode::chunked) continue;
      const std::int64_t chunks = pl.chunks(pl.de_pass), cols = pl.de_pass.cols;
      INFO("n " << s.n << " d " << s.d << " v " << s.v << " budget " << budget << ": " << chunks << " chunks of "
                << cols);
      CHECK(pl.workspace_bytes<__nv_bfloat16>() <= budget);
      CHECK(cols % 128 == 0);
      CHECK(s.v - (chunks - 1) * cols >= cols - 128 * chunks);  // the last: equal chunks, rounded up to tiles
      if (chunks == 1) continue;
      ++several;
      detail::plan fewer = pl;
      fewer.de_pass.cols = fewer.dc_pass.cols = detail::round_up(detail::ceil_div(s.v, chunks - 1), 128);
      CHECK(fewer.workspace_bytes<__nv_bfloat16>() > budget);
    }
  }
  CHECK(several > 0);
}

// The carried pass's carry that shares dE's buffer (plan::carry_shares_de): planned for 16-bit inputs without
// compensation where 256 divides D, N classes of 16-bit dC rows under the half left in dC; taken only by the sm_90a
// path writing 16-bit dE of row pitch D, 16-byte aligned, without a low-rank head.
TEST_CASE("plan: the carry that shares dE's buffer", "[plan]") {
  options o;
  o.backward_mode = backward_mode::minimal;
  const device_info h100{90, 132};
  constexpr std::int64_t n = 1400, v = 6007;
  alignas(16) static std::uint16_t de[8];
  const void* misaligned = reinterpret_cast<const char*>(de) + 2;
  int shared = 0;
  for (const std::int64_t d : {2048, 2048 + 128}) {
    for (bool kahan : {false, true}) {
      o.accum = kahan ? accumulation::kahan : accumulation::fp32;
      for (std::size_t budget = std::size_t(1) << 20; budget <= (std::size_t(64) << 20); budget = budget * 9 / 8) {
        const auto pl = detail::make_plan<__nv_bfloat16>(n, d, v, 0, false, o, 128, 128, h100, budget);
        if (pl.carried_pass.cols == 0) continue;
        INFO("d " << d << " kahan " << kahan << " budget " << budget << ": chunks of " << pl.carried_pass.cols);
        if (kahan || d % detail::shared_carry_tile != 0) {
          CHECK(pl.chunks_under_shared_carry == 0);
          CHECK_FALSE(pl.carry_shares_de(true, 2, de, d));
          continue;
        }
        ++shared;
        CHECK(pl.chunks_under_shared_carry == detail::ceil_div(n, pl.carried_pass.cols));
        CHECK(pl.chunks_under_shared_carry <= pl.chunks_under_carry);
        CHECK(pl.carry_shares_de(true, 2, de, d));
        CHECK_FALSE(pl.carry_shares_de(false, 2, de, d));     // the portable kernels
        CHECK_FALSE(pl.carry_shares_de(true, 4, de, d));      // fp32 gradients
        CHECK_FALSE(pl.carry_shares_de(true, 2, de, d + 8));  // strided dE
        CHECK_FALSE(pl.carry_shares_de(true, 2, misaligned, d));
        const auto lora = detail::make_plan<__nv_bfloat16>(n, d, v, 4, false, o, 128, 128, h100, budget);
        if (lora.carried_pass.cols > 0) CHECK_FALSE(lora.carry_shares_de(true, 2, de, d));
        const auto fp32 = detail::make_plan<float>(n, d, v, 0, false, o, 128, 128, h100, budget);
        CHECK(fp32.chunks_under_shared_carry == 0);
      }
    }
  }
  CHECK(shared > 0);
}

// With Kahan sums (the compensation beside the carry), a low-rank head, fp32 or 16-bit gradients and near-uniform
// rows (in bf16, as the near-uniform test below), each distinct carried plan of a range of budgets.
TEST_CASE("tiled executor: minimal's carried pass", "[executor][plan]") {
  for (int variant = 0; variant < 4; ++variant) {
    test::case_config cfg;
    cfg.n = 70;
    cfg.d = 24;
    cfg.v = 700;
    cfg.bias = true;
    cfg.seed = 40 + std::uint64_t(variant);
    cfg.opts = variant == 0 ? options::exact() : options{};
    cfg.opts.backward_mode = backward_mode::minimal;
    if (variant == 1) cfg.opts.accum = accumulation::kahan;
    if (variant == 2) cfg.rank = 3;
    if (variant == 3) {
      cfg.data = test::regime::uniform;
      cfg.opts.uniform_tolerance = 1.f / 16;
    }
    INFO(cfg.describe());
    int plans = 0;
    detail::pass_shape last{};
    for (std::size_t budget = 1; budget < (std::size_t(64) << 10) && plans < 3; budget += 512) {
      // Near-uniform rows at tolerance 1/16 drop more than the filter's bound covers (docs/api.md).
      const auto mode = variant == 3 ? test::gradient_check::relative : test::gradient_check::bound;
      bool checked = false;
      switch (variant) {
        case 0: checked = check_carried_pass<float, float>(cfg, budget, last, mode); break;
        case 1: checked = check_carried_pass<__half, float>(cfg, budget, last, mode); break;
        case 2: checked = check_carried_pass<__nv_bfloat16, float>(cfg, budget, last, mode); break;
        default: checked = check_carried_pass<__nv_bfloat16, __nv_bfloat16>(cfg, budget, last, mode); break;
      }
      plans += checked;
    }
    CHECK(plans > 0);
  }
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

// The filter on one gradient alone (options::filter_de, filter_dc; test::check_one_gradient_filter), at a threshold
// that skips tiles holding a visible share of the gradient. In one chunk (the default budget) the plans match and so
// do the sums, bit for bit; minimal's plans depend on the buffers each option needs, so its sums may be grouped
// otherwise and agree to fp32's rounding.
TEST_CASE("tiled executor: the filter on dE or dC alone", "[executor][filter]") {
  for (std::size_t budget : {std::size_t(0), std::size_t(1)}) {
    test::case_config cfg;
    cfg.n = 96;
    cfg.d = 128;
    cfg.v = 300;
    cfg.bias = true;
    cfg.data = test::regime::peaked;  // tiles far from the rows' dominant logits are negligible
    cfg.opts.filter_eps = 0.5f;
    auto run = [&](filter_mode filter, bool de, bool dc) {
      test::case_config c = cfg;
      c.opts.filter = filter;
      c.opts.filter_de = de;
      c.opts.filter_dc = dc;
      return run_executor<float, float>(test::make_problem<float>(c), budget, true);
    };
    INFO("budget " << budget);
    test::check_one_gradient_filter(run, [&](const std::vector<float>& a, const std::vector<float>& b) {
      return budget == 0 ? test::bitwise_equal(a, b) : test::relative_l2(a, b) <= 1e-6;
    });
  }
}

// Near-uniform rows (options::uniform_tolerance = 1/16, which the uniform data meets): every tile without a target
// is skipped, the baseline's share is added back, and the gradients stay within the filter's tolerance, with the
// per-row terms that enter the baseline (temperature, z-loss, class weights), the bias and a softcap. With the
// default tolerance (eps / 2, which this data does not meet) and a bias (no first-order baseline then), or a
// softcap whose factor strays too far from 1, nothing is skipped.
TEST_CASE("tiled executor: near-uniform rows take a baseline and skip their other tiles", "[executor][filter]") {
  for (std::size_t budget : {std::size_t(0), std::size_t(1)}) {
    for (int variant = 0; variant < 5; ++variant) {
      test::case_config cfg;
      cfg.n = 72;
      cfg.d = 48;
      cfg.v = 300;
      cfg.data = test::regime::uniform;
      cfg.seed = 41 + variant;
      cfg.bias = true;
      cfg.opts.uniform_tolerance = 1.f / 16;
      cfg.class_weights = variant == 1;
      cfg.opts.temperature = variant == 2 ? 0.7f : 1.f;
      cfg.opts.softcap = variant == 2 || variant == 5 ? 30.f : 0.f;
      cfg.opts.z_loss = variant == 2 ? 1e-2f : 0.f;
      cfg.opts.reduction = variant == 3 ? reduction::none : reduction::mean;
      cfg.opts.softcap = variant == 4 ? 30.f : 0.f;
      INFO("variant " << variant << " budget " << budget);
      const auto h = test::make_problem<__nv_bfloat16>(cfg);
      const test::case_results r = run_executor<__nv_bfloat16, __nv_bfloat16>(h, budget, true);
      test::check_case<__nv_bfloat16, __nv_bfloat16>(h, r, true, test::gradient_check::relative);
      // 72 rows, 300 classes: 5 x 19 tiles of 16, one target per row: at most 72 tiles hold one.
      CHECK(r.filter_tiles[0] + r.filter_tiles[1] == 5 * 19);
      CHECK(r.filter_tiles[0] <= 72);
      CHECK(r.filter_tiles[1] >= 5 * 19 - 72);
    }
  }
  for (int variant = 0; variant < 2; ++variant) {
    test::case_config cfg;
    cfg.n = 72;
    cfg.d = 48;
    cfg.v = 300;
    cfg.data = test::regime::uniform;
    cfg.seed = 45;
    cfg.bias = true;     // which keeps the first order out (under the softcap it would take these rows)
    if (variant == 1) {  // |z* - 2| = 2 against cap sqrt(1/16) / 2 = 1
      cfg.opts.uniform_tolerance = 1.f / 16;
      cfg.opts.softcap = 8.f;
    }
    const auto h = test::make_problem<__nv_bfloat16>(cfg);
    const test::case_results r = run_executor<__nv_bfloat16, __nv_bfloat16>(h, 0, true);
    test::check_case<__nv_bfloat16, __nv_bfloat16>(h, r, true, test::gradient_check::relative);
    CHECK(r.filter_tiles[1] == 0);
  }
}

namespace {

// The least budget (in steps of 256 bytes) at which a minimal backward plans the first-order baseline's products.
detail::plan linear_minimal_plan(const test::host_problem<__nv_bfloat16>& h, std::size_t& budget) {
  const host::tiled_executor<__nv_bfloat16> ex(h.cfg.opts, 16, 16, device_info{80, 4});
  auto plan = [&] { return ex.plan_for(h.view(), ex.workspace_bytes(h.view(), budget)); };
  for (budget = 0; budget < (std::size_t(1) << 20); budget += 256)
    if (plan().linear() && plan().mode == backward_mode::minimal) break;
  CHECK(plan().linear());
  CHECK(plan().mode == backward_mode::minimal);
  return plan();
}

}  // namespace

// Rows near-uniform to first order (the default tolerance; no bias): every tile is skipped, the linear share then the
// rows' one-hot terms are added after the walk (two more roundings of dE and dC in T), and the gradients stay within
// the tolerance, in both modes (minimal at the least budget that plans the share: the carried pass, or
// two passes when gradients accumulate), with the per-row terms of the baseline, a softcap (with a temperature),
// fp32 gradients and Kahan sums. On lm-like data no row qualifies and nothing is skipped.
TEST_CASE("tiled executor: rows near-uniform to first order skip every tile", "[executor][filter]") {
  int carried = 0;  // minimal plans of the carried pass
  for (bool minimal : {false, true}) {
    for (int variant = 0; variant < 6; ++variant) {
      test::case_config cfg;
      cfg.n = 72;
      cfg.d = 48;
      cfg.v = 300;
      cfg.data = test::regime::uniform;
      cfg.seed = 61 + variant;
      if (minimal) cfg.opts.backward_mode = backward_mode::minimal;
      cfg.class_weights = variant == 1;
      cfg.opts.temperature = variant == 2 ? 0.7f : 1.f;
      cfg.opts.softcap = variant == 2 || variant == 5 ? 30.f : 0.f;
      cfg.opts.z_loss = variant == 2 ? 1e-2f : 0.f;
      cfg.opts.reduction = variant == 3 ? reduction::none : reduction::mean;
      cfg.opts.accum = variant == 4 ? accumulation::kahan : accumulation::fp32;
      cfg.opts.accumulate = variant == 5;
      cfg.extra_row_roundings = cfg.extra_class_roundings = 2;
      const auto h = test::make_problem<__nv_bfloat16>(cfg);
      std::size_t budget = 0;
      if (minimal) {
        const detail::plan pl = linear_minimal_plan(h, budget);
        if (cfg.opts.accumulate) CHECK(pl.carried_pass.cols == 0);
        carried += pl.carried_pass.cols > 0;
      }
      INFO("variant " << variant << " budget " << budget);
      const test::case_results r = run_executor<__nv_bfloat16, __nv_bfloat16>(h, budget, true);
      test::check_case<__nv_bfloat16, __nv_bfloat16>(h, r, true, test::gradient_check::bound);
      // Every row takes the baseline and leaves its one-hot term to after the walk: no tile is computed.
      CHECK(r.filter_tiles[0] == 0);
      CHECK(r.filter_tiles[1] == 5 * 19);
      if (variant == 0) {
        const test::case_results f = run_executor<__nv_bfloat16, float>(h, budget, true);
        test::check_case<__nv_bfloat16, float>(h, f, true, test::gradient_check::bound);
      }
    }
  }
  CHECK(carried > 0);
  // Logits a tenth from flat, whose first-order share is about a tenth of the gradient: they pass at tolerance
  // 1/16 (1 - kappa about 0.005), with a softcap of 30 too, not at the default, nor on lm-like data, nor under a
  // softcap of 0.2 (whose curvature over logits of up to a few tenths exceeds the tolerance). With every third row of
  // the first row tile far from flat, its tiles are computed with the other rows' first-order draws in them.
  for (int variant = 0; variant < 8; ++variant) {
    test::case_config cfg;
    cfg.n = 72;
    cfg.d = 48;
    cfg.v = 300;
    cfg.seed = 67 + variant;
    cfg.data = variant == 3 ? test::regime::lm_like : test::regime::near_flat;
    if (variant != 2 && variant != 3) cfg.opts.uniform_tolerance = 1.f / 16;
    if (variant == 1) cfg.opts.backward_mode = backward_mode::minimal;
    cfg.opts.softcap = variant == 4 || variant == 7 ? 30.f : variant == 5 ? 0.2f : 0.f;
    cfg.extra_row_roundings = cfg.extra_class_roundings = 2;
    INFO("near-flat variant " << variant);
    const bool mixed = variant >= 6;
    if (mixed) cfg.sharp_rows = 16;
    const auto h = test::make_problem<__nv_bfloat16>(cfg);
    std::size_t budget = 0;
    if (variant == 1) linear_minimal_plan(h, budget);
    const test::case_results r = run_executor<__nv_bfloat16, __nv_bfloat16>(h, budget, true);
    test::check_case<__nv_bfloat16, __nv_bfloat16>(h, r, true, test::gradient_check::relative);
    if (mixed) {
      CHECK(r.filter_tiles[0] == 19);
      CHECK(r.filter_tiles[1] == 4 * 19);
    } else if (variant < 2 || variant == 4) {
      CHECK(r.filter_tiles[1] == 5 * 19);
    } else {
      CHECK(r.filter_tiles[1] == 0);
    }
  }
}

// Lone targets (kernel/portable/lone_targets.cuh): on peaked data each row's mass sits on its own class and no
// target is there, so the filter skips every tile but the 5 that hold the dominant classes, the 72 rows' target tiles
// included; their terms are added after the walk (one more rounding of dE and dC in T). At D = 128 with T = 0.1
// (dominant logits of about 110 against N(0, 10)) the chunked plan has the first-order share's products, which then
// do not run, and minimal's smallest plan has not; class weights with a z-loss, reduction none, fp32 gradients; at
// D = 512 a softcap of 5 at T = 0.1 (dominant logits of 50; the target's factor dz/draw, 0.7 to 1 over the targets'
// logits, is not left out of their terms). With the last 36 rows near-uniform (E scaled by 1e-3) and the share
// planned, those rows take it to first order and leave their one-hot terms, added with the lone targets' after its
// products (two more roundings); row tile 2, which holds both kinds, computes its tiles. Without the share the
// near-uniform rows' tiles are computed.
TEST_CASE("tiled executor: lone targets skip their tiles", "[executor][filter]") {
  for (bool minimal : {false, true}) {
    for (int variant = 0; variant < 5; ++variant) {
      test::case_config cfg;
      cfg.n = 72;
      cfg.d = variant == 3 ? 512 : 128;
      cfg.v = 300;
      cfg.data = test::regime::peaked;
      cfg.targets_off_peak = true;
      cfg.seed = 71 + variant;
      cfg.class_weights = variant == 1;
      cfg.opts.z_loss = variant == 1 ? 1e-2f : 0.f;
      cfg.opts.reduction = variant == 2 ? reduction::none : reduction::mean;
      cfg.opts.softcap = variant == 3 ? 5.f : 0.f;
      cfg.opts.temperature = 0.1f;
      const bool mixed = variant == 4;
      cfg.extra_row_roundings = cfg.extra_class_roundings = mixed ? 2 : 1;
      if (minimal) cfg.opts.backward_mode = backward_mode::minimal;
      const std::size_t budget = minimal ? 1 : 0;
      auto h = test::make_problem<__nv_bfloat16>(cfg);
      for (std::int64_t i = 36; mixed && i < cfg.n; ++i)
        for (std::int64_t k = 0; k < cfg.d; ++k)
          h.e[std::size_t(i * cfg.d + k)] =
              detail::from_float<__nv_bfloat16>(1e-3f * detail::to_float(h.e[std::size_t(i * cfg.d + k)]));
      const host::tiled_executor<__nv_bfloat16> ex(cfg.opts, 16, 16, device_info{80, 4});
      const detail::plan pl = ex.plan_for(h.view(), ex.workspace_bytes(h.view(), budget));
      INFO("variant " << variant << " minimal " << minimal);
      CHECK(pl.linear_rows);
      CHECK(pl.linear() == (!minimal && cfg.d == 128));
      const test::case_results r = run_executor<__nv_bfloat16, __nv_bfloat16>(h, budget, true);
      test::check_case<__nv_bfloat16, __nv_bfloat16>(h, r, true, test::gradient_check::bound);
      CHECK(r.filter_tiles[0] == (!mixed ? 5 : pl.linear() ? 2 + 19 : 2 + 3 * 19));
      CHECK(r.filter_tiles[0] + r.filter_tiles[1] == 5 * 19);
      if (variant == 0) {
        const test::case_results f = run_executor<__nv_bfloat16, float>(h, budget, true);
        test::check_case<__nv_bfloat16, float>(h, f, true, test::gradient_check::bound);
      }
    }
  }
}

// Rows whose one dominant class stands a softcap's compressed distance above flat logits (the benchmark's gpt2 on
// peaked data, scaled down): at D = 1,024 the dominant raw logit is about 32, which a softcap of 19 holds at about
// 17.7 (saturated: within 0.2 across rows), against N(0, 1) elsewhere. The tile maxima (about 2.8 over run_executor's
// 16 x 16 tiles) do not skip the other tiles, 16 p_max n_tiles staying above eps (checked on the inputs), but the
// split budget does: only the splits holding a row tile's dominant classes are computed, the target tiles elsewhere
// leaving their terms to after the walk.
TEST_CASE("tiled executor: splits whose share of the mass is negligible skip their tiles", "[executor][filter]") {
  using bf16 = __nv_bfloat16;
  test::case_config cfg;
  cfg.n = 128;
  cfg.d = 1024;
  cfg.v = 2000;
  cfg.data = test::regime::peaked;
  cfg.targets_off_peak = true;
  cfg.seed = 91;
  cfg.opts.softcap = 19.f;
  cfg.extra_row_roundings = cfg.extra_class_roundings = 1;  // the lone targets' terms
  const auto h = test::make_problem<bf16>(cfg);
  const host::tiled_executor<bf16> ex(cfg.opts, 16, 16, device_info{80, 4});  // as run_executor's
  const detail::plan pl = ex.plan_for(h.view(), ex.workspace_bytes(h.view(), 0));
  const tile::tile_grid& g = pl.grid;
  REQUIRE(pl.filter);
  REQUIRE(pl.splits >= 4);

  // The first row tile against the last column tile, far from its dominant classes: the maxima keep it.
  auto logit = [&](std::int64_t row, std::int64_t col) {
    double raw = 0.0;
    for (std::int64_t k = 0; k < cfg.d; ++k)
      raw += double(detail::to_float(h.e[std::size_t(row * cfg.d + k)])) *
             double(detail::to_float(h.c[std::size_t(col * cfg.d + k)]));
    return 19.0 * std::tanh(raw / 19.0);
  };
  const std::int64_t last = g.col_tiles() - 1;
  double tile_max = -INFINITY, floor = INFINITY;
  for (std::int64_t row = 0; row < g.bm; ++row) {
    double sum = 0.0;
    for (std::int64_t col = 0; col < cfg.v; ++col) {
      const double z = logit(row, col);
      if (col != h.t64[std::size_t(row)]) sum += std::exp(z);
      if (col >= g.col_begin(last)) tile_max = std::max(tile_max, z);
    }
    floor = std::min(floor, std::log(sum));
  }
  const auto f = filter::mass_threshold::make(filter::eps_of<bf16>(cfg.opts), g.bn, detail::filter_tiles(g, cfg.v));
  INFO("log p_max " << tile_max - floor << ", threshold " << f.log_threshold);
  CHECK_FALSE(f.skip(float(tile_max - floor)));

  // Computed: the tiles of the splits that hold a row tile's dominant classes (row i dominates class i).
  std::int64_t computed = 0;
  for (std::int64_t rt = 0; rt < g.row_tiles(); ++rt)
    for (std::int64_t s = 0; s < pl.splits; ++s) {
      const std::int64_t b = tile::split_begin(g.col_tiles(), pl.splits, s);
      const std::int64_t e = tile::split_begin(g.col_tiles(), pl.splits, s + 1);
      if (g.col_begin(b) < g.row_begin(rt) + g.rows_in(rt) && g.row_begin(rt) < g.col_begin(e)) computed += e - b;
    }
  const test::case_results r = run_executor<bf16, bf16>(h, 0, true);
  test::check_case<bf16, bf16>(h, r, true, test::gradient_check::bound);
  CHECK(r.filter_tiles[0] == computed);
  CHECK(r.filter_tiles[0] + r.filter_tiles[1] == g.tiles());

  // The saved budget: every row's drop under eps, the flat splits skipped.
  const std::size_t saved_bytes = ex.saved_bytes(h.view()), ws_bytes = ex.workspace_bytes(h.view(), 0);
  const test::aligned_buffer saved(saved_bytes), ws(ws_bytes);
  float loss = 0.f;
  forward_outputs out;
  out.loss = &loss;
  REQUIRE(ex.forward(h.view(), out, saved.get(), saved_bytes, ws.get(), ws_bytes) == status::success);
  CHECK(test::check_split_budget(h, pl, pl.carve_saved(saved.get())) == g.tiles() - computed);
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
