// Problems with extreme values, shared by the CPU executor and GPU tests: logits around +-1e4 (with and without
// softcap), NaN and Inf in E or C, fp16 inputs whose logits reach the fp16 range, very peaked and perfectly
// uniform softmax. Each is compared with the float64 reference (which propagates NaN and Inf as torch does);
// `expect` adds the checks that spell out the propagation.
#pragma once

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "case_check.hpp"

namespace cce::test {

template <class T>
struct extreme_case {
  std::string what;
  host_problem<T> h;
  gradient_check mode = gradient_check::bound;
  std::function<void(const case_results&)> expect = [](const case_results&) {};
};

inline bool all_finite(const std::vector<float>& x) {
  for (float v : x)
    if (!std::isfinite(v)) return false;
  return true;
}
inline bool all_nan(const std::vector<float>& x) {
  for (float v : x)
    if (!std::isnan(v)) return false;
  return true;
}

// No output holds NaN or Inf.
inline void expect_finite(const case_results& r) {
  CHECK(all_finite(r.loss));
  CHECK(all_finite(r.lse));
  CHECK(all_finite(r.entropy));
  CHECK(all_finite(r.target_logprob));
  CHECK(all_finite(r.de));
  CHECK(all_finite(r.dc));
  CHECK(all_finite(r.dbias));
}

// Row `row` of a row-major matrix with `cols` columns.
inline std::vector<float> row_of(const std::vector<float>& m, std::int64_t row, std::int64_t cols) {
  return {m.begin() + row * cols, m.begin() + (row + 1) * cols};
}

template <class T>
void scale_elements(std::vector<T>& x, std::size_t begin, std::size_t end, float factor) {
  for (std::size_t i = begin; i < end; ++i) x[i] = detail::from_float<T>(detail::to_float(x[i]) * factor);
}

// The cases for element type T with options `opts` (reduction none, so that per-row losses are visible).
template <class T>
std::vector<extreme_case<T>> extreme_cases(options opts) {
  opts.reduction = reduction::none;
  case_config base;
  base.n = 72;
  base.d = 48;
  base.v = 300;
  base.bias = true;
  base.opts = opts;
  std::vector<extreme_case<T>> cases;
  const std::int64_t d = base.d;

  // Logits around +-1e4: every other row's embedding scaled by 1000 (lm-like logits are within about +-10).
  for (float softcap : {0.f, 30.f}) {
    case_config cfg = base;
    cfg.seed = 101;
    cfg.opts.softcap = softcap;
    extreme_case<T> c{softcap ? "logits +-1e4, softcap 30" : "logits +-1e4", make_problem<T>(cfg)};
    for (std::int64_t i = 0; i < cfg.n; i += 2)
      scale_elements(c.h.e, std::size_t(i * d), std::size_t((i + 1) * d), 1000.f);
    c.expect = expect_finite;
    cases.push_back(std::move(c));
  }

  // NaN in one element of E: that row's loss, lse and dE row are NaN, the other rows are unaffected; every dC
  // and dBias element sums that row's NaN gradient.
  {
    case_config cfg = base;
    cfg.seed = 102;
    extreme_case<T> c{"NaN in E (row 5)", make_problem<T>(cfg)};
    c.h.e[std::size_t(5 * d + 3)] = detail::from_float<T>(NAN);
    c.expect = [n = cfg.n, d](const case_results& r) {
      for (std::int64_t i = 0; i < n; ++i) {
        CHECK(std::isnan(r.loss[std::size_t(i)]) == (i == 5));
        CHECK(std::isnan(r.lse[std::size_t(i)]) == (i == 5));
        CHECK((i == 5 ? all_nan(row_of(r.de, i, d)) : all_finite(row_of(r.de, i, d))));
      }
      CHECK(all_nan(r.dc));
      CHECK(all_nan(r.dbias));
    };
    cases.push_back(std::move(c));
  }

  // NaN in one element of C: class 17's logit is NaN in every row, so is every row's loss and every gradient.
  {
    case_config cfg = base;
    cfg.seed = 103;
    extreme_case<T> c{"NaN in C (class 17)", make_problem<T>(cfg)};
    c.h.c[std::size_t(17 * d + 3)] = detail::from_float<T>(NAN);
    c.expect = [](const case_results& r) {
      CHECK(all_nan(r.loss));
      CHECK(all_nan(r.lse));
      CHECK(all_nan(r.de));
      CHECK(all_nan(r.dc));
    };
    cases.push_back(std::move(c));
  }

  // +Inf in E without softcap: the row's logits are +-Inf, its loss NaN (log-softmax of +Inf is NaN in torch)
  // and so is every dC element. With softcap they saturate at +-k: a finite loss and dE, while the column of dC
  // = dZ^T E that meets the Inf holds 0 * Inf = NaN.
  for (float softcap : {0.f, 30.f}) {
    case_config cfg = base;
    cfg.seed = 104;
    cfg.opts.softcap = softcap;
    extreme_case<T> c{softcap ? "+Inf in E (row 9), softcap 30" : "+Inf in E (row 9)", make_problem<T>(cfg)};
    c.h.e[std::size_t(9 * d)] = detail::from_float<T>(INFINITY);
    c.expect = [n = cfg.n, v = cfg.v, d, softcap](const case_results& r) {
      for (std::int64_t i = 0; i < n; ++i) {
        CHECK(std::isnan(r.loss[std::size_t(i)]) == (i == 9 && softcap == 0.f));
        CHECK(all_finite(row_of(r.de, i, d)) == (i != 9 || softcap != 0.f));
      }
      if (softcap == 0.f) CHECK(all_nan(r.dc));
      for (std::int64_t k = 0; softcap != 0.f && k < v; ++k) {
        const std::vector<float> row = row_of(r.dc, k, d);
        CHECK(std::isnan(row[0]));
        CHECK(all_finite({row.begin() + 1, row.end()}));
      }
    };
    cases.push_back(std::move(c));
  }

  // Very peaked: lm-like logits scaled by 3, so that 1 - p_y is about 1e-8 and below.
  {
    case_config cfg = base;
    cfg.seed = 105;
    extreme_case<T> c{"very peaked softmax", make_problem<T>(cfg), gradient_check::relative};
    scale_elements(c.h.e, 0, c.h.e.size(), 3.f);
    c.expect = expect_finite;
    cases.push_back(std::move(c));
  }

  // Perfectly uniform softmax, two ways: every class has the same classifier row (all logits of a row equal),
  // and E = 0 (every logit equals the bias; here no bias, so all are 0). dE then cancels exactly: the rounding
  // bound, not a relative error, is the criterion.
  {
    case_config cfg = base;
    cfg.seed = 106;
    extreme_case<T> c{"all-equal logits (identical classifier rows)", make_problem<T>(cfg)};
    for (std::int64_t v = 1; v < cfg.v; ++v)
      for (std::int64_t k = 0; k < d; ++k) c.h.c[std::size_t(v * d + k)] = c.h.c[std::size_t(k)];
    c.h.bias.assign(c.h.bias.size(), detail::from_float<T>(0.25f));
    c.expect = [v = cfg.v](const case_results& r) {
      expect_finite(r);
      for (float loss : r.loss) CHECK(loss == Approx(std::log(double(v))).epsilon(1e-5));
    };
    cases.push_back(std::move(c));
  }
  {
    case_config cfg = base;
    cfg.seed = 107;
    cfg.bias = false;
    extreme_case<T> c{"zero logits (E = 0)", make_problem<T>(cfg)};
    c.h.e.assign(c.h.e.size(), detail::from_float<T>(0.f));
    c.expect = [v = cfg.v](const case_results& r) {
      expect_finite(r);
      for (float loss : r.loss) CHECK(loss == Approx(std::log(double(v))).epsilon(1e-5));
      for (float x : r.dc) CHECK(x == 0.f);  // dC = dZ^T E
    };
    cases.push_back(std::move(c));
  }
  return cases;
}

// fp16 inputs whose logits reach about +-2e4..6e4 (inputs up to a few hundred, still far from 65504 themselves);
// mean reduction keeps every gradient within fp16's range.
inline extreme_case<__half> fp16_near_overflow(options opts) {
  case_config cfg;
  cfg.n = 64;
  cfg.d = 64;
  cfg.v = 257;
  cfg.seed = 108;
  cfg.opts = opts;
  extreme_case<__half> c{"fp16 logits near the fp16 range", make_problem<__half>(cfg)};
  scale_elements(c.h.e, 0, c.h.e.size(), 100.f);
  scale_elements(c.h.c, 0, c.h.c.size(), 100.f);
  c.expect = expect_finite;
  return c;
}

}  // namespace cce::test
