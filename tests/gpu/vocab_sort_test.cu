// Vocabulary sorting (options::vocab_sort) on the GPU: the sorted backward against the float64 reference on
// randomized and featured problems, on the portable and (where they apply) the sm_90a kernels for the rest of the
// call; sorted against unsorted; bitwise repeatability; the filter's tile counters and the tiles sorting saves.
#include <catch2/catch.hpp>

#include <random>

#include "../common/device_case.cuh"

namespace {

using namespace cce;
using bf16 = __nv_bfloat16;
using test::run_device;

template <class T, class G>
void check_sorted(test::case_config cfg, std::size_t budget, test::gradient_check mode) {
  cfg.opts.vocab_sort = true;
  const auto h = test::make_problem<T>(cfg);
  test::check_case<T, G>(h, run_device<T, G>(h, budget), true, mode);
}

// Tiles of the default 128 x 128 grid (the sm_90a filter grid too).
std::int64_t grid_tiles(const test::case_config& cfg) { return ((cfg.n + 127) / 128) * ((cfg.v + 127) / 128); }

}  // namespace

TEST_CASE("GPU sorted backward matches the float64 reference on randomized cases", "[gpu][sort]") {
  std::mt19937_64 rng(5151);
  for (int i = 0; i < 160; ++i) {
    test::case_config cfg =
        i % 5 == 4 ? test::random_config(rng, 700, 300, 3000) : test::random_config(rng, 160, 200, 700);
    cfg.index = i;
    if (!test::case_selected(i)) continue;
    const std::size_t budget = i % 3 == 0 ? 0 : i % 3 == 1 ? 1 : std::size_t(256) << 10;
    cfg.opts.hopper_kernels = (i / 5) % 2 == 0;
    switch (i % 5) {
      case 0:
        check_sorted<bf16, bf16>(cfg, budget, test::gradient_check::bound);
        break;
      case 1:
        check_sorted<bf16, float>(cfg, budget, test::gradient_check::bound);
        break;
      case 2:
        check_sorted<__half, __half>(cfg, budget, test::gradient_check::bound);
        break;
      case 3:
        check_sorted<float, float>(cfg, budget, test::gradient_check::bound);
        break;
      default:
        check_sorted<bf16, bf16>(cfg, budget, test::gradient_check::bound);
        break;
    }
  }
}

TEST_CASE("GPU sorted backward: every data regime and option at the design's tolerances", "[gpu][sort]") {
  for (auto data : {test::regime::lm_like, test::regime::uniform, test::regime::peaked}) {
    for (bool exact : {true, false}) {
      for (bool hopper : {true, false}) {
        test::case_config cfg;
        cfg.n = 301;  // odd sizes, a ragged last tile each way; D a multiple of 8 so the sm_90a forward applies
        cfg.d = 136;
        cfg.v = 2001;
        cfg.data = data;
        cfg.bias = true;
        cfg.class_weights = data == test::regime::peaked;
        cfg.rank = data == test::regime::lm_like ? 4 : 0;
        cfg.ignore_fraction = 0.25;
        cfg.seed = 7 + int(data);
        cfg.opts = exact ? options::exact() : options{};
        cfg.opts.softcap = data == test::regime::lm_like ? 30.f : 0.f;
        cfg.opts.hopper_kernels = hopper;
        for (std::size_t budget : {std::size_t(0), std::size_t(1)}) {
          check_sorted<bf16, bf16>(cfg, budget, test::gradient_check::relative);
          check_sorted<__half, float>(cfg, budget, test::gradient_check::relative);
        }
      }
    }
  }
  test::case_config tiny;  // V smaller than one tile, N = 1
  tiny.n = 1;
  tiny.d = 24;
  tiny.v = 37;
  tiny.bias = true;
  for (bool hopper : {true, false}) {
    tiny.opts.hopper_kernels = hopper;
    check_sorted<bf16, bf16>(tiny, 0, test::gradient_check::relative);
    check_sorted<float, float>(tiny, 1, test::gradient_check::relative);
  }
}

TEST_CASE("GPU sorted and unsorted backward agree without the filter", "[gpu][sort]") {
  for (bool hopper : {true, false}) {
    for (std::size_t budget : {std::size_t(0), std::size_t(1)}) {
      test::case_config cfg;
      cfg.n = 261;
      cfg.d = 96;
      cfg.v = 1703;
      cfg.bias = true;
      cfg.class_weights = true;
      cfg.rank = 4;
      cfg.ignore_fraction = 0.2;
      cfg.opts = options::exact();
      cfg.opts.hopper_kernels = hopper;
      auto h = test::make_problem<bf16>(cfg);
      const auto plain = run_device<bf16, float>(h, budget);
      h.cfg.opts.vocab_sort = true;
      const auto sorted = run_device<bf16, float>(h, budget);
      const double tol = test::gradient_tolerance<bf16>(cfg.opts);
      INFO("hopper " << hopper << " budget " << budget);
      CHECK(test::relative_l2(sorted.de, plain.de) <= tol);
      CHECK(test::relative_l2(sorted.dc, plain.dc) <= tol);
      CHECK(test::relative_l2(sorted.dbias, plain.dbias) <= tol);
      CHECK(test::relative_l2(sorted.da, plain.da) <= tol);
      CHECK(test::relative_l2(sorted.db, plain.db) <= tol);
      CHECK(test::bitwise_equal(sorted.loss, plain.loss));
    }
  }
}

TEST_CASE("GPU sorted backward in exact mode is bitwise repeatable", "[gpu][sort][determinism]") {
  for (bool hopper : {true, false}) {
    test::case_config cfg;
    cfg.n = 257;
    cfg.d = 136;
    cfg.v = 1500;
    cfg.bias = true;
    cfg.rank = 2;
    cfg.opts = options::exact();
    cfg.opts.hopper_kernels = hopper;
    cfg.opts.vocab_sort = true;
    const auto h = test::make_problem<bf16>(cfg);
    for (std::size_t budget : {std::size_t(0), std::size_t(1)}) {
      const auto first = run_device<bf16, bf16>(h, budget);
      for (int run = 0; run < 3; ++run) test::check_bitwise_equal(first, run_device<bf16, bf16>(h, budget));
    }
  }
}

TEST_CASE("GPU filter tile counters cover the grid, sorted or not", "[gpu][sort]") {
  for (bool sorted : {false, true}) {
    for (bool hopper : {true, false}) {
      for (auto data : {test::regime::lm_like, test::regime::uniform, test::regime::peaked}) {
        for (std::size_t budget : {std::size_t(0), std::size_t(1)}) {
          test::case_config cfg;
          cfg.n = 300;
          cfg.d = 64;
          cfg.v = 2000;
          cfg.data = data;
          cfg.seed = 3 + std::uint64_t(data);
          cfg.opts.vocab_sort = sorted;
          cfg.opts.hopper_kernels = hopper;
          INFO("sorted " << sorted << " hopper " << hopper << " data " << test::to_string(data) << " budget "
                         << budget);
          const auto filtered = run_device<bf16, bf16>(test::make_problem<bf16>(cfg), budget);
          CHECK(filtered.filter_tiles[0] + filtered.filter_tiles[1] == grid_tiles(cfg));
          // The mass bound keeps a flat softmax whole (the sorted walk); unsorted, its rows may take the baseline to
          // first order and skip every tile (their one-hot terms go to the products).
          const bool flat_unsorted = data == test::regime::uniform && !sorted;
          if (!flat_unsorted) CHECK(filtered.filter_tiles[0] >= 1);
          if (data == test::regime::uniform && sorted) CHECK(filtered.filter_tiles[1] == 0);
          cfg.opts.filter = filter_mode::none;
          const auto all = run_device<bf16, bf16>(test::make_problem<bf16>(cfg), budget);
          CHECK(all.filter_tiles[0] == grid_tiles(cfg));
          CHECK(all.filter_tiles[1] == 0);
        }
      }
    }
  }
}

TEST_CASE("GPU: sorting clusters the probable classes, so more tiles are skipped", "[gpu][sort]") {
  // Eight frequent classes, 1021 apart, hold nearly all of every row's softmax mass (a large bias) and are the
  // rows' targets. Unsorted each lies in its own vocab tile; sorted they share the first one.
  test::case_config cfg;
  cfg.n = 512;
  cfg.d = 64;
  cfg.v = 8192;
  cfg.bias = true;
  cfg.seed = 9;
  auto h = test::make_problem<bf16>(cfg);
  for (std::int64_t k = 0; k < 8; ++k) h.bias[std::size_t(k * 1021 + 5)] = detail::from_float<bf16>(40.f);
  for (std::int64_t i = 0; i < cfg.n; ++i) {
    h.t64[std::size_t(i)] = (i % 8) * 1021 + 5;
    h.t32[std::size_t(i)] = std::int32_t(h.t64[std::size_t(i)]);
  }
  const std::int64_t row_tiles = (cfg.n + 127) / 128;
  for (bool hopper : {true, false}) {
    auto run = [&](bool sorted) {
      auto hh = h;
      hh.cfg.opts.vocab_sort = sorted;
      hh.cfg.opts.hopper_kernels = hopper;
      const auto r = run_device<bf16, bf16>(hh, 0);
      test::check_case<bf16, bf16>(hh, r, true, test::gradient_check::relative);
      return r;
    };
    const auto plain = run(false), sorted = run(true);
    INFO("hopper " << hopper << ": unsorted computed " << plain.filter_tiles[0] << ", sorted computed "
                   << sorted.filter_tiles[0] << " of " << grid_tiles(cfg));
    CHECK(plain.filter_tiles[0] == row_tiles * 8);
    CHECK(sorted.filter_tiles[0] == row_tiles * 1);
  }
}
