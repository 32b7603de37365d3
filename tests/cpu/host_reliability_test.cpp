// The reliability guarantees of docs/reliability.md that the CPU tiled executor (the kernels' algorithm on the
// host) can show: invalid targets, ignore_index, empty and degenerate shapes, a disabled low-rank head, and
// extreme values (+-1e4 logits, NaN and Inf inputs, fp16 near its range, peaked and uniform softmax), against the
// float64 reference. The GPU mirror is tests/gpu/reliability_test.cu.
#include <catch2/catch.hpp>

#include <cmath>

#include "../common/extreme_cases.hpp"
#include "../common/host_case.hpp"

namespace {

using namespace cce;
using bf16 = __nv_bfloat16;

constexpr std::size_t budgets[] = {0, 1};  // chunked (default budget) and the smallest minimal plan

test::case_config small_case(std::uint64_t seed) {
  test::case_config cfg;
  cfg.n = 40;
  cfg.d = 24;
  cfg.v = 50;
  cfg.bias = true;
  cfg.seed = seed;
  return cfg;
}

}  // namespace

TEST_CASE("invalid targets: reported, NaN loss, gradients as if the rows were ignored", "[reliability][bad-input]") {
  for (auto red : {reduction::mean, reduction::sum, reduction::none}) {
    for (bool int32 : {false, true}) {
      for (std::size_t budget : budgets) {
        test::case_config cfg = small_case(11);
        cfg.int32_targets = int32;
        cfg.opts.reduction = red;
        auto h = test::make_problem<bf16>(cfg);
        auto clean = h;  // the same problem with the bad rows ignored
        for (std::int64_t row : {3, 7, 39}) {
          const std::int64_t bad = row == 3 ? cfg.v : row == 7 ? -5 : std::int64_t(1) << 40;
          h.t64[std::size_t(row)] = bad;
          h.t32[std::size_t(row)] = row == 39 ? INT32_MIN : std::int32_t(bad);
          clean.t64[std::size_t(row)] = clean.t32[std::size_t(row)] = std::int32_t(cfg.opts.ignore_index);
        }
        INFO(cfg.describe() << " budget=" << budget);
        const auto r = test::run_executor<bf16, bf16>(h, budget, true);
        const auto ok = test::run_executor<bf16, bf16>(clean, budget, true);
        test::check_case<bf16, bf16>(clean, ok, true);
        CHECK(r.error == int(status::invalid_target));
        if (red == reduction::none) {
          for (std::int64_t i = 0; i < cfg.n; ++i) {
            const bool bad = i == 3 || i == 7 || i == 39;
            CHECK(std::isnan(r.loss[std::size_t(i)]) == bad);
            if (!bad) CHECK(r.loss[std::size_t(i)] == ok.loss[std::size_t(i)]);
          }
        } else {
          CHECK(std::isnan(r.loss[0]));  // never a number presented as the loss
        }
        CHECK(test::bitwise_equal(r.lse, ok.lse));  // lse is defined for every row
        CHECK(test::bitwise_equal(r.de, ok.de));
        CHECK(test::bitwise_equal(r.dc, ok.dc));
        CHECK(test::bitwise_equal(r.dbias, ok.dbias));
      }
    }
  }
}

TEST_CASE("ignore_index other than -100", "[reliability][bad-input]") {
  for (std::int64_t ignore : {std::int64_t(-1), std::int64_t(5), std::int64_t(0)}) {
    test::case_config cfg = small_case(12);
    cfg.opts.ignore_index = ignore;
    cfg.opts.reduction = reduction::mean;
    auto h = test::make_problem<bf16>(cfg);
    for (std::int64_t row : {1, 2, 30}) h.t64[std::size_t(row)] = ignore;  // a valid class when ignore >= 0
    const auto r = test::run_executor<bf16, bf16>(h, 0, true);
    test::check_case<bf16, bf16>(h, r, true);
    CHECK(r.error == 0);
  }
  // With ignore_index -1, torch's default -100 is an ordinary (invalid) target.
  test::case_config cfg = small_case(13);
  cfg.opts.ignore_index = -1;
  auto h = test::make_problem<bf16>(cfg);
  h.t64[4] = -100;
  const auto r = test::run_executor<bf16, bf16>(h, 0, false);
  CHECK(r.error == int(status::invalid_target));
  CHECK(std::isnan(r.loss[0]));
}

TEST_CASE("every row ignored: mean is NaN (0/0, as torch), sum 0, gradients 0", "[reliability][bad-input]") {
  for (auto red : {reduction::mean, reduction::sum, reduction::none}) {
    for (std::size_t budget : budgets) {
      test::case_config cfg = small_case(14);
      cfg.ignore_fraction = 1.0;
      cfg.opts.reduction = red;
      const auto h = test::make_problem<bf16>(cfg);
      const auto r = test::run_executor<bf16, bf16>(h, budget, true);
      test::check_case<bf16, bf16>(h, r, true);
      if (red == reduction::mean) CHECK(std::isnan(r.loss[0]));
      else
        for (float x : r.loss) CHECK(x == 0.f);
      for (const auto* g : {&r.de, &r.dc, &r.dbias})
        for (float x : *g) CHECK(x == 0.f);
      CHECK(r.error == 0);
    }
  }
}

TEST_CASE("degenerate shapes: N = 0, V = 1, D = 1", "[reliability][bad-input]") {
  struct shape {
    std::int64_t n, d, v;
  };
  for (shape s : {shape{0, 24, 50}, shape{40, 24, 1}, shape{40, 1, 50}, shape{1, 1, 1}}) {
    for (auto red : {reduction::mean, reduction::sum, reduction::none}) {
      for (std::size_t budget : budgets) {
        test::case_config cfg = small_case(15);
        cfg.n = s.n;
        cfg.d = s.d;
        cfg.v = s.v;
        cfg.opts.reduction = red;
        cfg.opts.z_loss = 1e-3f;  // with V = 1 the cross-entropy term is 0: z-loss keeps a gradient
        const auto h = test::make_problem<bf16>(cfg);
        const auto r = test::run_executor<bf16, bf16>(h, budget, true);
        // Tiny D or V is ill-conditioned: the rounding bound, as for the randomized cases.
        test::check_case<bf16, bf16>(h, r, true, test::gradient_check::bound);
        if (s.n == 0) {
          CHECK((red == reduction::mean ? std::isnan(r.loss.at(0)) : red == reduction::sum ? r.loss.at(0) == 0.f
                                                                                            : r.loss.empty()));
          for (float x : r.dc) CHECK(x == 0.f);  // written, not left as they were
          for (float x : r.dbias) CHECK(x == 0.f);
        }
      }
    }
  }
}

TEST_CASE("a low-rank head of rank 0 is ignored, whatever its pointers", "[reliability][bad-input]") {
  test::case_config cfg = small_case(16);
  const auto h = test::make_problem<bf16>(cfg);
  problem<bf16> p = h.view();
  alignas(256) static const bf16 never_read[1] = {};
  p.lora.a = never_read;  // rank 0: never dereferenced (a read past it would show under ASan)
  p.lora.b = never_read;
  p.lora.scale = NAN;
  const auto with = test::run_executor<bf16, bf16>(h, p, 0, true);
  const auto without = test::run_executor<bf16, bf16>(h, 0, true);
  CHECK(test::bitwise_equal(with.loss, without.loss));
  CHECK(test::bitwise_equal(with.de, without.de));
  CHECK(test::bitwise_equal(with.dc, without.dc));
}

TEST_CASE("extreme values on the CPU executor", "[reliability][extreme]") {
  for (bool exact : {true, false}) {
    for (auto& c : test::extreme_cases<bf16>(exact ? options::exact() : options{})) {
      for (std::size_t budget : budgets) {
        INFO(c.what << (exact ? " (exact)" : " (default)") << " budget=" << budget);
        const auto r = test::run_executor<bf16, bf16>(c.h, budget, true);
        test::check_case<bf16, bf16>(c.h, r, true, c.mode);
        c.expect(r);
      }
    }
    auto c = test::fp16_near_overflow(exact ? options::exact() : options{});
    INFO(c.what);
    const auto r = test::run_executor<__half, __half>(c.h, 0, true);
    test::check_case<__half, __half>(c.h, r, true, c.mode);
    c.expect(r);
  }
}
