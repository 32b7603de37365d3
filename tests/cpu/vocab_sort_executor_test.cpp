// Vocabulary sorting (options::vocab_sort) on the CPU tiled executor: the sorted backward against the float64
// reference on odd shapes and every option, sorted against unsorted, bitwise repeatability, the filter's tile
// counters, and the workspace budgets of both operating points with the sort's buffers.
#include <catch2/catch.hpp>

#include <random>

#include "../common/host_case.hpp"

namespace {

using namespace cce;
using test::run_executor;

template <class T, class G>
test::case_results run_sorted(test::case_config cfg, std::size_t budget, bool sorted = true) {
  cfg.opts.vocab_sort = sorted;
  return run_executor<T, G>(test::make_problem<T>(cfg), budget, true);
}

template <class T, class G>
void check_sorted(test::case_config cfg, std::size_t budget, test::gradient_check mode) {
  cfg.opts.vocab_sort = true;
  const auto h = test::make_problem<T>(cfg);
  test::check_case<T, G>(h, run_executor<T, G>(h, budget, true), true, mode);
}

void check_bitwise_equal(const test::case_results& a, const test::case_results& b) {
  CHECK(test::bitwise_equal(a.loss, b.loss));
  CHECK(test::bitwise_equal(a.de, b.de));
  CHECK(test::bitwise_equal(a.dc, b.dc));
  CHECK(test::bitwise_equal(a.dbias, b.dbias));
  CHECK(test::bitwise_equal(a.da, b.da));
  CHECK(test::bitwise_equal(a.db, b.db));
}

// Tiles of the executor's 16 x 16 grid.
std::int64_t grid_tiles(const test::case_config& cfg) { return ((cfg.n + 15) / 16) * ((cfg.v + 15) / 16); }

}  // namespace

TEST_CASE("sorted backward matches the float64 reference on randomized cases", "[sort][executor]") {
  std::mt19937_64 rng(20260315);
  for (int i = 0; i < 600; ++i) {
    test::case_config cfg = test::random_config(rng, 40, 40, 80);
    cfg.index = i;
    if (!test::case_selected(i)) continue;
    const std::size_t budget = i % 3 == 0 ? 0 : i % 3 == 1 ? 1 : 24 * 1024;
    switch (i % 4) {
      case 0:
        check_sorted<__nv_bfloat16, __nv_bfloat16>(cfg, budget, test::gradient_check::bound);
        break;
      case 1:
        check_sorted<__nv_bfloat16, float>(cfg, budget, test::gradient_check::bound);
        break;
      case 2:
        check_sorted<__half, __half>(cfg, budget, test::gradient_check::bound);
        break;
      default:
        check_sorted<float, float>(cfg, budget, test::gradient_check::bound);
        break;
    }
  }
}

TEST_CASE("sorted backward: featured shapes and options at the design's tolerances", "[sort][executor]") {
  struct shape {
    std::int64_t n, d, v;
  };
  // Odd sizes, V smaller than one tile, a single row, many chunks.
  const shape shapes[] = {{37, 23, 101}, {16, 8, 7}, {1, 5, 3}, {70, 33, 300}, {45, 16, 17}};
  for (const shape& sh : shapes) {
    for (auto data : {test::regime::lm_like, test::regime::uniform, test::regime::peaked}) {
      for (bool exact : {true, false}) {
        test::case_config cfg;
        cfg.n = sh.n;
        cfg.d = sh.d;
        cfg.v = sh.v;
        cfg.data = data;
        cfg.bias = true;
        cfg.class_weights = sh.v % 2 == 1;
        cfg.rank = sh.d % 2 == 1 ? 3 : 0;
        cfg.ignore_fraction = 0.25;
        cfg.seed = std::uint64_t(sh.n * 1000 + sh.v) + std::uint64_t(data);
        cfg.opts = exact ? options::exact() : options{};
        cfg.opts.softcap = sh.v > 100 ? 20.f : 0.f;
        for (std::size_t budget : {std::size_t(0), std::size_t(1)}) {
          check_sorted<__nv_bfloat16, __nv_bfloat16>(cfg, budget, test::gradient_check::relative);
          check_sorted<float, float>(cfg, budget, test::gradient_check::relative);
        }
      }
    }
  }
}

TEST_CASE("sorted and unsorted backward agree without the filter", "[sort][executor]") {
  // The default budget gives both the same chunked plan; the smallest budget gives the sorted walk (whose key and
  // order buffers take room) a minimal plan and the unsorted one a chunked plan.
  for (std::size_t budget : {std::size_t(0), std::size_t(1)}) {
    test::case_config cfg;
    cfg.n = 61;
    cfg.d = 27;
    cfg.v = 203;
    cfg.bias = true;
    cfg.class_weights = true;
    cfg.rank = 4;
    cfg.ignore_fraction = 0.25;
    cfg.opts = options::exact();
    const auto sorted = run_sorted<__nv_bfloat16, float>(cfg, budget);
    const auto plain = run_sorted<__nv_bfloat16, float>(cfg, budget, false);
    const double tol = test::gradient_tolerance<__nv_bfloat16>(cfg.opts);
    CHECK(test::relative_l2(sorted.de, plain.de) <= tol);
    CHECK(test::relative_l2(sorted.da, plain.da) <= tol);
    CHECK(test::relative_l2(sorted.dc, plain.dc) <= tol);
    CHECK(test::relative_l2(sorted.dbias, plain.dbias) <= tol);
    CHECK(test::relative_l2(sorted.db, plain.db) <= tol);
    if (budget == 0) {
      // Same plan: dZ is the same value in both walks and each class gradient sums it over the rows in the same
      // order, so the class gradients are equal bit for bit.
      CHECK(test::bitwise_equal(sorted.dc, plain.dc));
      CHECK(test::bitwise_equal(sorted.dbias, plain.dbias));
      CHECK(test::bitwise_equal(sorted.db, plain.db));
    }
    CHECK(sorted.loss == plain.loss);
  }
}

TEST_CASE("sorted backward in exact mode is bitwise repeatable", "[sort][executor]") {
  test::case_config cfg;
  cfg.n = 50;
  cfg.d = 24;
  cfg.v = 170;
  cfg.bias = true;
  cfg.rank = 2;
  cfg.opts = options::exact();
  for (std::size_t budget : {std::size_t(0), std::size_t(1)}) {
    const auto first = run_sorted<__nv_bfloat16, __nv_bfloat16>(cfg, budget);
    const auto again = run_sorted<__nv_bfloat16, __nv_bfloat16>(cfg, budget);
    check_bitwise_equal(first, again);
  }
}

TEST_CASE("the filter's tile counters cover the grid, sorted or not", "[sort][executor]") {
  for (bool sorted : {false, true}) {
    for (auto data : {test::regime::lm_like, test::regime::uniform, test::regime::peaked}) {
      for (std::size_t budget : {std::size_t(0), std::size_t(1)}) {
        test::case_config cfg;
        cfg.n = 70;
        cfg.d = 32;
        cfg.v = 400;
        cfg.data = data;
        cfg.seed = 3 + std::uint64_t(data);
        INFO("sorted " << sorted << " data " << test::to_string(data) << " budget " << budget);
        const auto filtered = run_sorted<__nv_bfloat16, __nv_bfloat16>(cfg, budget, sorted);
        CHECK(filtered.filter_tiles[0] + filtered.filter_tiles[1] == grid_tiles(cfg));
        // The mass bound keeps a flat softmax whole (the sorted walk); unsorted, its rows may take the baseline to
        // first order and skip every tile (their one-hot terms go to the products).
        const bool flat_unsorted = data == test::regime::uniform && !sorted;
        if (!flat_unsorted) CHECK(filtered.filter_tiles[0] >= 1);
        if (data == test::regime::uniform && sorted) CHECK(filtered.filter_tiles[1] == 0);
        cfg.opts = options::exact();
        const auto all = run_sorted<__nv_bfloat16, __nv_bfloat16>(cfg, budget, sorted);
        CHECK(all.filter_tiles[0] == grid_tiles(cfg));
        CHECK(all.filter_tiles[1] == 0);
      }
    }
  }
}

TEST_CASE("sorting clusters the probable classes: more tiles are skipped", "[sort][executor]") {
  // A few frequent classes, scattered over the vocabulary, hold nearly all the softmax mass of every row (a large
  // bias); the rows' targets are among them. Unsorted, each lies in its own vocab tile; sorted, they share one.
  test::case_config cfg;
  cfg.n = 64;
  cfg.d = 32;
  cfg.v = 512;
  cfg.bias = true;
  cfg.seed = 9;
  auto h = test::make_problem<__nv_bfloat16>(cfg);
  for (std::int64_t k = 0; k < 8; ++k) h.bias[std::size_t(k * 61 + 5)] = detail::from_float<__nv_bfloat16>(24.f);
  for (std::int64_t i = 0; i < cfg.n; ++i) {
    h.t64[std::size_t(i)] = (i % 8) * 61 + 5;
    h.t32[std::size_t(i)] = std::int32_t(h.t64[std::size_t(i)]);
  }
  auto run = [&](bool sorted) {
    auto hh = h;
    hh.cfg.opts.vocab_sort = sorted;
    const auto r = run_executor<__nv_bfloat16, __nv_bfloat16>(hh, 0, true);
    test::check_case<__nv_bfloat16, __nv_bfloat16>(hh, r, true, test::gradient_check::relative);
    return r;
  };
  const auto plain = run(false), sorted = run(true);
  INFO("unsorted computed " << plain.filter_tiles[0] << ", sorted computed " << sorted.filter_tiles[0] << " of "
                            << grid_tiles(cfg));
  CHECK(plain.filter_tiles[0] == 4 * 8);   // 4 row tiles x the 8 tiles holding a frequent class
  CHECK(sorted.filter_tiles[0] == 4 * 1);  // 4 row tiles x the first sorted tile
}

TEST_CASE("the sort's buffers fit both operating points' budgets", "[sort][executor]") {
  test::case_config cfg;
  cfg.n = 300;
  cfg.d = 64;
  cfg.v = 5000;
  cfg.bias = true;
  cfg.class_weights = true;
  cfg.rank = 8;
  const auto h = test::make_problem<__nv_bfloat16>(cfg);
  const problem<__nv_bfloat16> p = h.view();
  for (bool sorted : {false, true}) {
    options o;
    o.vocab_sort = sorted;
    const host::tiled_executor<__nv_bfloat16> ex(o, 16, 16, device_info{80, 4});
    for (std::size_t budget : {std::size_t(2) << 20, std::size_t(512) << 10}) {
      const auto pl = ex.plan_for(p, budget);
      INFO("sorted " << sorted << " budget " << budget);
      CHECK(pl.sort == sorted);
      CHECK(ex.workspace_bytes(p, budget) <= budget);
    }
    o.backward_mode = backward_mode::minimal;
    const host::tiled_executor<__nv_bfloat16> minimal(o, 16, 16, device_info{80, 4});
    CHECK(minimal.plan_for(p, std::size_t(256) << 10).mode == backward_mode::minimal);
    CHECK(minimal.workspace_bytes(p, std::size_t(256) << 10) <= std::size_t(256) << 10);
  }
}
