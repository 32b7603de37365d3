// Runs one case's exact float64 reference and compares an executor's results with it, with the tolerances of
// docs/testing.md: loss and lse to 1e-5 relative (fp32 accumulation); each gradient to u(T) relative L2 in exact
// mode and 2 u(T) with the gradient filter on the data regimes; randomized cases, which include ill-conditioned
// ones (tiny D or V, near-certain targets: the gradient is a difference of much larger terms), are held to the
// rounding bound of the algorithm instead. Failures print the case's one-line reproducer.
#pragma once

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include <cce/detail/element_type.hpp>
#include <cce/host/reference.hpp>
#include <cce/status.hpp>
#include "random_problem.hpp"

namespace cce::test {

// An executor's results, converted to float on the host.
struct case_results {
  std::vector<float> loss;  // 1 value, or N for reduction none
  std::vector<float> lse, entropy, target_logprob;
  std::vector<std::uint8_t> correct;
  int error = 0;
  std::vector<float> de, dc, dbias, da, db;
  std::int64_t filter_tiles[2] = {-1, -1};  // vocabulary tiles the backward computed and skipped
};

// Bitwise equality of two runs' values (NaN compares by its bits too).
inline bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// The upstream gradient used by the backward checks: a scalar for mean/sum, per row for none.
inline std::vector<float> make_grad_loss(const case_config& cfg) {
  std::mt19937_64 rng(cfg.seed ^ 0x5eed);
  std::uniform_real_distribution<float> u(0.5f, 1.5f);
  std::vector<float> g(cfg.opts.reduction == reduction::none ? std::size_t(cfg.n) : 1, 1.f);
  if (!cfg.unit_grad)
    for (float& x : g) x = u(rng);
  return g;
}

// Values the gradient buffers hold before the backward (options::accumulate adds to them).
inline std::vector<float> make_prefill(std::size_t count, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 1e-3f);
  std::vector<float> v(count);
  for (float& x : v) x = nd(rng);
  return v;
}

// Expected gradient: the reference plus what was there before when accumulating, rounded like the output.
template <class G>
std::vector<double> expected_gradient(const std::vector<double>& ref, bool accumulate, std::uint64_t prefill_seed) {
  std::vector<double> e(ref);
  if (accumulate) {
    const std::vector<float> prefill = make_prefill(e.size(), prefill_seed);
    for (std::size_t i = 0; i < e.size(); ++i) e[i] += double(detail::to_float(detail::from_float<G>(prefill[i])));
  }
  return e;
}

// Which gradient the filter may drop part of: dE, dC, or those that follow the walk's tiles (dBias and the
// low-rank factors': filtered with both gradients, computed from every tile when only one is filtered).
enum class gradient_kind { de, dc, walk };
inline bool filter_applies(const options& o, gradient_kind g) {
  if (o.filter == filter_mode::none || (!o.filter_de && !o.filter_dc)) return false;
  if (o.filter_de == o.filter_dc) return true;
  return g == gradient_kind::de ? o.filter_de : g == gradient_kind::dc ? o.filter_dc : false;
}

template <class T>
double gradient_tolerance(const options& o, gradient_kind g = gradient_kind::walk) {
  return (filter_applies(o, g) ? 2.0 : 1.0) * double(detail::unit_roundoff<T>());
}

// How a gradient is judged.
enum class gradient_check {
  relative,  // ||got - ref|| <= tol ||ref||: the design's targets, for the data regimes
  bound,     // ||got - ref|| <= u (||ref|| + k ||scale||): the output's rounding plus rounding dZ to T before the
             // products (|error| <= u sum |dZ| |C| per element), k = 1 exact and 2 with the filter, whose dropped
             // mass is below eps <= u of the same sums; for randomized cases, conditioning included
};

// The L2 norm of the values that are not NaN (NaN positions are compared as a pattern by relative_l2).
inline double l2(const std::vector<double>& x) {
  double s = 0.0;
  for (double v : x)
    if (!std::isnan(v)) s += v * v;
  return std::sqrt(s);
}

// Half the spacing of T's subnormals: the absolute rounding error of values below its normal range (fp16 reaches it
// with small gradients; bf16 and fp32 practically never).
template <class T>
constexpr double subnormal_half_spacing() {
  return std::is_same_v<T, __half> ? 0x1p-25 : std::is_same_v<T, __nv_bfloat16> ? 0x1p-134 : 0x1p-150;
}

// The rounding bound of a gradient (gradient_check::bound): the output's rounding plus rounding dZ to T before
// the products, k = 1 exact and 2 with the filter; `terms` dZ values summed per element, `count` elements.
template <class T>
double gradient_error_bound(double ref_norm, double scale_norm, double k, double terms, std::size_t count) {
  const double floor = subnormal_half_spacing<T>() * (1 + k * terms) * std::sqrt(double(count));
  return double(detail::unit_roundoff<T>()) * (ref_norm + k * scale_norm) + floor;
}

// Compares `got` with the float64 reference of the case. `G` is the gradient type the executor wrote.
template <class T, class G>
void check_case(const host_problem<T>& h, const case_results& got, bool with_backward,
                gradient_check mode = gradient_check::relative) {
  const case_config& cfg = h.cfg;
  INFO("case: " << cfg.describe() << " | T=" << detail::element_traits<T>::name
                << " G=" << detail::element_traits<G>::name);
  const problem<T> p = h.view();
  const host::dense_problem dense = host::to_dense(p, cfg.opts);
  const auto ref = host::reference_forward(dense, cfg.opts);

  CHECK(got.error == (ref.invalid_target ? int(status::invalid_target) : 0));
  if (ref.invalid_target) return;  // the loss is NaN by contract; the gradients are unspecified

  constexpr double loss_tol = 1e-5;
  if (cfg.opts.reduction == reduction::none) {
    CHECK(relative_l2(got.loss, ref.loss_rows) <= loss_tol);
  } else {
    const double want = ref.loss_scalar, have = double(got.loss[0]);
    if (std::isnan(want)) {
      CHECK(std::isnan(have));
    } else {
      CHECK(std::abs(have - want) <= loss_tol * std::max(std::abs(want), 1e-3));
    }
  }
  // Outputs that are differences with lse are compared on lse's scale.
  const double lse_norm = std::max(l2(ref.lse), 1e-30);
  auto on_lse_scale = [&](const std::vector<float>& x, const std::vector<double>& r) {
    double num = 0.0;
    for (std::size_t i = 0; i < r.size(); ++i) {
      if (std::isnan(double(x[i])) != std::isnan(r[i])) return double(INFINITY);
      if (!std::isnan(r[i])) num += (double(x[i]) - r[i]) * (double(x[i]) - r[i]);
    }
    return std::sqrt(num) / lse_norm;
  };
  if (!got.lse.empty()) CHECK(relative_l2(got.lse, ref.lse) <= loss_tol);
  if (!got.entropy.empty()) CHECK(on_lse_scale(got.entropy, ref.entropy) <= loss_tol);
  if (!got.target_logprob.empty()) CHECK(on_lse_scale(got.target_logprob, ref.target_logprob) <= loss_tol);
  if (!got.correct.empty()) CHECK(got.correct == ref.correct);

  if (!with_backward) return;
  const std::vector<float> grad_f = make_grad_loss(cfg);
  const std::vector<double> grad(grad_f.begin(), grad_f.end());
  const auto rg = host::reference_backward(dense, cfg.opts, grad, ref);
  const bool acc = cfg.opts.accumulate;
  // `terms`: how many rounded dZ values each element of the gradient sums.
  auto check_grad = [&](const char* name, gradient_kind kind, const std::vector<float>& have,
                        const std::vector<double>& want, const std::vector<double>& scale, double terms,
                        std::uint64_t salt, double roundings = 0) {
    if (have.empty()) return;
    const double tol = gradient_tolerance<T>(cfg.opts, kind);
    const double k = filter_applies(cfg.opts, kind) ? 2.0 : 1.0;
    const auto expected = expected_gradient<G>(want, acc, cfg.seed + salt);
    const double err = relative_l2(have, expected);
    if (mode == gradient_check::relative) {
      INFO("gradient " << name << " relative L2 error " << err << " tolerance " << tol);
      CHECK(err <= tol);
    } else {
      const double ref_norm = l2(expected);
      const double bound = gradient_error_bound<T>(ref_norm, l2(scale), k + roundings, terms, want.size());
      const double abs_err = ref_norm > 0 ? err * ref_norm : err;
      INFO("gradient " << name << " L2 error " << abs_err << " bound " << bound << " (relative " << err << ")");
      CHECK(abs_err <= bound);
    }
  };
  const double n = double(cfg.n), v = double(cfg.v);
  const double row_roundings = std::is_same_v<G, float> ? 0.0 : double(cfg.extra_row_roundings);
  using kind = gradient_kind;
  check_grad("dE", kind::de, got.de, rg.de, rg.de_scale, v + double(cfg.rank), 1, row_roundings);
  const double class_roundings = std::is_same_v<G, float> ? 0.0 : double(cfg.extra_class_roundings);
  check_grad("dC", kind::dc, got.dc, rg.dc, rg.dc_scale, n, 2, class_roundings);
  check_grad("dBias", kind::walk, got.dbias, rg.dbias, rg.dbias_scale, n, 3, class_roundings);
  check_grad("dA", kind::walk, got.da, rg.da, rg.da_scale, n * v, 4);
  check_grad("dB", kind::walk, got.db, rg.db, rg.db_scale, n, 5);
}

// The filter on one gradient (options::filter_de, filter_dc) against the runs filtering neither gradient and both:
// the gradient left out is the unfiltered run's and the filtered one the doubly filtered run's (the same tiles of the
// same dZ); dBias takes every tile; with neither the filter is off. `run(filter, de, dc)` gives a case's results,
// `same` compares two of them. The doubly filtered run must drop a share of every gradient well above the
// comparisons' own tolerance (bitwise, or fp32 rounding), or they would say nothing.
template <class Run, class Same>
void check_one_gradient_filter(Run run, Same same) {
  const case_results none = run(filter_mode::none, true, true), both = run(filter_mode::threshold, true, true);
  INFO("tiles computed " << both.filter_tiles[0] << ", skipped " << both.filter_tiles[1]);
  REQUIRE(both.filter_tiles[1] > 0);
  REQUIRE(relative_l2(both.de, none.de) > 1e-5);
  REQUIRE(relative_l2(both.dc, none.dc) > 1e-5);
  REQUIRE(relative_l2(both.dbias, none.dbias) > 1e-5);
  const case_results de_only = run(filter_mode::threshold, true, false);
  CHECK(same(de_only.de, both.de));
  CHECK(same(de_only.dc, none.dc));
  CHECK(same(de_only.dbias, none.dbias));
  CHECK(de_only.filter_tiles[1] == both.filter_tiles[1]);
  const case_results dc_only = run(filter_mode::threshold, false, true);
  CHECK(same(dc_only.de, none.de));
  CHECK(same(dc_only.dc, both.dc));
  CHECK(same(dc_only.dbias, none.dbias));
  const case_results neither = run(filter_mode::threshold, false, false);
  CHECK(same(neither.de, none.de));
  CHECK(same(neither.dc, none.dc));
  CHECK(neither.filter_tiles[1] == 0);
}

}  // namespace cce::test
