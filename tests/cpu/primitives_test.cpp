// The host/device primitives (online softmax, compensated sums, argmax, logit transform, per-row loss terms,
// gradient filter, tile arithmetic, element types) against float64 computations and exact properties. These are
// the same functions the kernels call, compiled here by the host compiler.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cce/detail/element_type.hpp>
#include <cce/detail/math.hpp>
#include <cce/epilogue/logit_transform.hpp>
#include <cce/epilogue/row_loss.hpp>
#include <cce/epilogue/row_partial.hpp>
#include <cce/filter/predicates.hpp>
#include <cce/reduce/argmax.hpp>
#include <cce/reduce/kahan.hpp>
#include <cce/reduce/online_softmax.hpp>
#include <cce/tile/policy.hpp>
#include <cce/tile/tile_grid.hpp>

namespace {

using namespace cce;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kMax = std::numeric_limits<float>::max();
constexpr double kU = 0x1p-24;  // unit roundoff of float

// ---------------------------------------------------------------------------------------------------------------
// Helpers

std::uint32_t bits_of(float x) {
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

// Position of x on a line where adjacent floats are one apart (+0 and -0 coincide).
std::int64_t ordinal(float x) {
  std::int32_t i;
  std::memcpy(&i, &x, sizeof i);
  return i < 0 ? std::int64_t(std::numeric_limits<std::int32_t>::min()) - i : std::int64_t(i);
}

std::int64_t ulp_distance(float a, float b) {
  const std::int64_t d = ordinal(a) - ordinal(b);
  return d < 0 ? -d : d;
}

bool same_bits(float a, float b) { return bits_of(a) == bits_of(b); }

bool same_stats(const softmax_stats& a, const softmax_stats& b) {
  return same_bits(a.max, b.max) && same_bits(a.sum_exp, b.sum_exp) && same_bits(a.sum_exp_z, b.sum_exp_z);
}

// Float64 two-pass softmax statistics of finite logits.
struct ref_softmax {
  double max = 0, sum_exp = 0, lse = 0, mean = 0;
  double abs_mean = 0;  // sum_v p_v |z_v|: the scale of mean's rounding error
};

ref_softmax reference_softmax(const std::vector<float>& z, std::size_t begin, std::size_t end) {
  ref_softmax r;
  r.max = -std::numeric_limits<double>::infinity();
  for (std::size_t i = begin; i < end; ++i) r.max = std::max(r.max, double(z[i]));
  double t = 0, a = 0;
  for (std::size_t i = begin; i < end; ++i) {
    const double w = std::exp(double(z[i]) - r.max);
    r.sum_exp += w;
    t += w * double(z[i]);
    a += w * std::fabs(double(z[i]));
  }
  r.lse = r.max + std::log(r.sum_exp);
  r.mean = t / r.sum_exp;
  r.abs_mean = a / r.sum_exp;
  return r;
}

ref_softmax reference_softmax(const std::vector<float>& z) { return reference_softmax(z, 0, z.size()); }

softmax_stats push_range(const std::vector<float>& z, std::size_t begin, std::size_t end) {
  softmax_stats s;
  for (std::size_t i = begin; i < end; ++i) s = softmax_push(s, z[i]);
  return s;
}

softmax_stats push_all(const std::vector<float>& z) { return push_range(z, 0, z.size()); }

softmax_stats merge_linear(const std::vector<softmax_stats>& parts, const std::vector<std::size_t>& order) {
  softmax_stats s;
  for (std::size_t k : order) s = softmax_merge(s, parts[k]);
  return s;
}

softmax_stats merge_tree(std::vector<softmax_stats> parts) {
  if (parts.empty()) return {};
  while (parts.size() > 1) {
    std::vector<softmax_stats> next;
    for (std::size_t i = 0; i + 1 < parts.size(); i += 2) next.push_back(softmax_merge(parts[i], parts[i + 1]));
    if (parts.size() % 2) next.push_back(parts.back());
    parts.swap(next);
  }
  return parts[0];
}

// Random logits of a few shapes: uniform, gaussian, one spike over a small background, many exact ties.
std::vector<float> random_logits(std::mt19937_64& rng, std::size_t n, double scale, int kind) {
  std::vector<float> z(n);
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  std::normal_distribution<double> gauss(0.0, 1.0);
  for (std::size_t i = 0; i < n; ++i) {
    switch (kind % 4) {
      case 0: z[i] = float(scale * uni(rng)); break;
      case 1: z[i] = float(scale * std::max(-4.0, std::min(4.0, gauss(rng))) / 4); break;
      case 2: z[i] = float(scale * 1e-3 * uni(rng)); break;
      default: z[i] = float(scale * std::round(4 * uni(rng)) / 4); break;
    }
  }
  if (kind % 4 == 2) z[std::size_t(rng() % n)] = float(scale);
  return z;
}

// Tolerance on a float lse against the float64 value: rounding of lse itself plus the rounding of the running sum
// of n positive terms (a generous multiple of the sqrt(n) growth of recursive summation).
double lse_tolerance(double lse, std::size_t n) {
  return 4 * kU * std::max(1.0, std::fabs(lse)) + 8 * kU * std::sqrt(double(n));
}

// ---------------------------------------------------------------------------------------------------------------
// Online softmax

TEST_CASE("online softmax: push matches a float64 two-pass computation", "[primitives][softmax]") {
  std::mt19937_64 rng(0x5eed0001);
  std::vector<std::size_t> lengths = {1, 2, 3, 5, 17, 100, 128, 129, 1000, 4096, 4999, 5000};
  for (int i = 0; i < 12; ++i) lengths.push_back(1 + std::size_t(rng() % 5000));
  const double scales[] = {1e-3, 0.1, 1, 10, 100, 1e3, 1e4};
  for (std::size_t n : lengths) {
    for (double scale : scales) {
      for (int kind = 0; kind < 4; ++kind) {
        const std::vector<float> z = random_logits(rng, n, scale, kind);
        const ref_softmax r = reference_softmax(z);
        const softmax_stats s = push_all(z);
        INFO("n = " << n << ", scale = " << scale << ", kind = " << kind);
        REQUIRE(double(s.max) == r.max);  // the max is exact
        const double lse_err = std::fabs(double(s.lse()) - r.lse);
        const double mean_err = std::fabs(double(s.mean_logit()) - r.mean);
        CHECK(lse_err <= lse_tolerance(r.lse, n));
        CHECK(mean_err <= 16 * kU * std::sqrt(double(n)) * r.abs_mean);
        CHECK(std::fabs(double(s.sum_exp) - r.sum_exp) <= 8 * kU * std::sqrt(double(n)) * r.sum_exp);
      }
    }
  }
}

TEST_CASE("online softmax: chunks merge to the same result in any split and any order", "[primitives][softmax]") {
  std::mt19937_64 rng(0x5eed0002);
  const double scales[] = {1e-2, 1, 30, 1e3, 1e4};
  for (int trial = 0; trial < 200; ++trial) {
    const std::size_t n = 1 + std::size_t(rng() % 5000);
    const double scale = scales[trial % 5];
    const std::vector<float> z = random_logits(rng, n, scale, trial / 5);
    const ref_softmax r = reference_softmax(z);

    // A random split into 1..48 chunks; repeated cut points give empty chunks (identity stats).
    const std::size_t chunks = 1 + std::size_t(rng() % 48);
    std::vector<std::size_t> cuts = {0, n};
    for (std::size_t k = 1; k < chunks; ++k) cuts.push_back(std::size_t(rng() % (n + 1)));
    std::sort(cuts.begin(), cuts.end());
    std::vector<softmax_stats> parts;
    for (std::size_t k = 0; k + 1 < cuts.size(); ++k) parts.push_back(push_range(z, cuts[k], cuts[k + 1]));

    std::vector<std::size_t> order(parts.size());
    std::iota(order.begin(), order.end(), std::size_t(0));
    std::vector<softmax_stats> results = {merge_linear(parts, order), merge_tree(parts)};
    for (int perm = 0; perm < 6; ++perm) {
      std::shuffle(order.begin(), order.end(), rng);
      results.push_back(merge_linear(parts, order));
      std::vector<softmax_stats> shuffled;
      for (std::size_t k : order) shuffled.push_back(parts[k]);
      results.push_back(merge_tree(shuffled));
    }

    INFO("trial " << trial << ": n = " << n << ", scale = " << scale << ", chunks = " << parts.size());
    // Merging k chunk sums rounds each term between log2(k) and k times: a few ulps, growing slowly with k.
    const std::int64_t allowed_ulps = std::max<std::int64_t>(8, std::int64_t(parts.size()) / 2);
    for (const softmax_stats& s : results) {
      REQUIRE(double(s.max) == r.max);
      // Any split (and any order) against float64.
      CHECK(std::fabs(double(s.lse()) - r.lse) <= lse_tolerance(r.lse, n));
      CHECK(std::fabs(double(s.mean_logit()) - r.mean) <= 16 * kU * std::sqrt(double(n)) * r.abs_mean);
      // Any order of the same chunks against each other: a few ulps.
      CHECK(ulp_distance(s.sum_exp, results[0].sum_exp) <= allowed_ulps);
      // lse = max + log(sum_exp): a relative difference d of sum_exp is an absolute difference d of lse.
      CHECK(std::fabs(double(s.lse()) - double(results[0].lse())) <=
            double(allowed_ulps) * 2 * kU + 4 * kU * std::fabs(double(results[0].lse())));
      CHECK(std::fabs(double(s.sum_exp_z) - double(results[0].sum_exp_z)) <=
            double(allowed_ulps) * 2 * kU * r.abs_mean * double(results[0].sum_exp));
    }
  }
}

TEST_CASE("online softmax: default stats are the identity of merge and push", "[primitives][softmax]") {
  const softmax_stats id;
  CHECK(id.max == -kInf);
  CHECK(id.sum_exp == 0.f);
  CHECK(id.sum_exp_z == 0.f);
  CHECK(id.lse() == -kInf);
  CHECK(same_stats(softmax_merge(id, id), id));

  std::mt19937_64 rng(0x5eed0003);
  for (int trial = 0; trial < 100; ++trial) {
    const std::vector<float> z = random_logits(rng, 1 + std::size_t(rng() % 300), trial % 2 ? 1e4 : 3.0, trial);
    const softmax_stats s = push_all(z);
    CHECK(same_stats(softmax_merge(id, s), s));
    CHECK(same_stats(softmax_merge(s, id), s));
  }
  // Pushing one logit onto the identity gives exactly (z, 1, z).
  for (float z : {0.f, -0.f, 1.f, -7.5f, 1e4f, -1e4f, 3e38f, -3e38f, kMax, -kMax, 1e-40f}) {
    const softmax_stats s = softmax_push(id, z);
    CHECK(same_bits(s.max, z));
    CHECK(s.sum_exp == 1.f);
    CHECK(s.sum_exp_z == z);
    CHECK(s.lse() == z);
  }
}

TEST_CASE("online softmax: rows of -inf logits have lse -inf and merge neutrally", "[primitives][softmax]") {
  softmax_stats dead;
  for (int i = 0; i < 1000; ++i) dead = softmax_push(dead, -kInf);
  CHECK(same_stats(dead, softmax_stats{}));
  CHECK(dead.lse() == -kInf);
  CHECK(softmax_merge(dead, dead).lse() == -kInf);

  // -inf logits inside a row change nothing, wherever they are.
  std::mt19937_64 rng(0x5eed0004);
  for (int trial = 0; trial < 50; ++trial) {
    const std::vector<float> z = random_logits(rng, 1 + std::size_t(rng() % 500), 20.0, trial);
    std::vector<float> with_masked = z;
    for (int k = 0; k < 20; ++k) {
      with_masked.insert(with_masked.begin() + long(rng() % (with_masked.size() + 1)), -kInf);
    }
    const softmax_stats s = push_all(z);
    CHECK(same_stats(push_all(with_masked), s));
    CHECK(same_stats(softmax_merge(dead, s), s));
    CHECK(same_stats(softmax_merge(s, dead), s));
  }
}

TEST_CASE("online softmax: +inf and NaN logits propagate", "[primitives][softmax]") {
  std::mt19937_64 rng(0x5eed0005);
  for (float bad : {kInf, kNaN}) {
    for (int trial = 0; trial < 40; ++trial) {
      std::vector<float> z = random_logits(rng, 1 + std::size_t(rng() % 200), trial % 2 ? 1e4 : 5.0, trial);
      const std::size_t at = std::size_t(rng() % (z.size() + 1));
      z.insert(z.begin() + long(at), bad);
      INFO("bad logit " << bad << " at " << at << " of " << z.size());
      // Pushed anywhere in the row.
      const softmax_stats pushed = push_all(z);
      // Merged from either side, and merged with the identity.
      const softmax_stats left = push_range(z, 0, at + 1), right = push_range(z, at + 1, z.size());
      const softmax_stats lhs = push_range(z, 0, at), rhs = push_range(z, at, z.size());
      for (const softmax_stats& s : {pushed, softmax_merge(left, right), softmax_merge(right, left),
                                     softmax_merge(lhs, rhs), softmax_merge(rhs, lhs),
                                     softmax_merge(softmax_stats{}, rhs)}) {
        if (bad != bad) {
          CHECK(std::isnan(s.lse()));
        } else {
          CHECK(!(s.lse() < kInf));  // +inf or NaN, never a finite value or -inf
        }
      }
    }
  }
  // max_f lets NaN win in either argument position.
  CHECK(std::isnan(detail::max_f(kNaN, 1.f)));
  CHECK(std::isnan(detail::max_f(1.f, kNaN)));
  CHECK(std::isnan(detail::min_f(kNaN, 1.f)));
  CHECK(std::isnan(detail::min_f(1.f, kNaN)));
  CHECK(detail::max_f(-kInf, 2.f) == 2.f);
  CHECK(detail::min_f(kInf, 2.f) == 2.f);
}

TEST_CASE("online softmax: extreme logits do not overflow", "[primitives][softmax]") {
  SECTION("+-1e4") {
    std::vector<float> z;
    for (int i = 0; i < 1000; ++i) z.push_back(i % 2 ? 1e4f : -1e4f);
    const softmax_stats s = push_all(z);
    CHECK(s.max == 1e4f);
    CHECK(s.sum_exp == 500.f);
    CHECK(std::fabs(double(s.lse()) - (1e4 + std::log(500.0))) <= 2 * kU * 1e4);
    CHECK(s.mean_logit() == Approx(1e4).epsilon(1e-6));
    std::reverse(z.begin(), z.end());
    CHECK(push_all(z).lse() == s.lse());
  }
  SECTION("+-3e38 and +-FLT_MAX") {
    for (float big : {3e38f, kMax}) {
      // One huge logit among huge negative ones, in both orders.
      softmax_stats s = softmax_push(softmax_push(softmax_stats{}, -big), big);
      softmax_stats t = softmax_push(softmax_push(softmax_stats{}, big), -big);
      for (const softmax_stats& u : {s, t, softmax_merge(softmax_push({}, -big), softmax_push({}, big)),
                                     softmax_merge(softmax_push({}, big), softmax_push({}, -big))}) {
        CHECK(u.max == big);
        CHECK(u.sum_exp == 1.f);
        CHECK(u.lse() == big);
        CHECK(u.mean_logit() == big);
      }
      // All logits hugely negative: lse = -big + log n stays finite.
      softmax_stats neg;
      for (int i = 0; i < 64; ++i) neg = softmax_push(neg, -big);
      CHECK(neg.sum_exp == 64.f);
      CHECK(std::isfinite(neg.lse()));
      CHECK(neg.lse() == Approx(-double(big)).epsilon(1e-7));
      // sum_exp_z = sum_v exp(z_v - max) z_v is not normalised: it holds up to V times the largest |z|, so
      // mean_logit is exact only while that fits in a float (64 logits of -big / 128 here).
      softmax_stats part;
      for (int i = 0; i < 64; ++i) part = softmax_push(part, -big / 128);
      CHECK(std::isfinite(part.sum_exp_z));
      CHECK(part.mean_logit() == Approx(-double(big) / 128).epsilon(1e-6));
      // Mixing finite moderate logits with huge ones on either side.
      softmax_stats mixed = softmax_merge(neg, softmax_push(softmax_push({}, 0.f), 5.f));
      CHECK(mixed.max == 5.f);
      CHECK(std::fabs(double(mixed.lse()) - (5 + std::log1p(std::exp(-5.0)))) <= 4 * kU * 5);
      mixed = softmax_merge(mixed, softmax_push({}, big));
      CHECK(mixed.lse() == big);
    }
  }
}

TEST_CASE("online softmax: merge is associative and commutative (property)", "[primitives][softmax]") {
  std::mt19937_64 rng(0x5eed0006);
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  auto random_stats = [&](double& zmax) {
    if (rng() % 10 == 0) return softmax_stats{};
    const double offset = (rng() % 2) ? 30 * uni(rng) : 1e4 * uni(rng);
    const double spread = (rng() % 2) ? 1.0 : 10.0;
    softmax_stats s;
    for (std::size_t i = 0, n = 1 + rng() % 40; i < n; ++i) {
      const float z = float(offset + spread * uni(rng));
      zmax = std::max(zmax, std::fabs(double(z)));
      s = softmax_push(s, z);
    }
    return s;
  };
  for (int trial = 0; trial < 20000; ++trial) {
    double zmax = 1;
    const softmax_stats a = random_stats(zmax), b = random_stats(zmax), c = random_stats(zmax);
    const softmax_stats l = softmax_merge(softmax_merge(a, b), c);
    const softmax_stats r = softmax_merge(a, softmax_merge(b, c));
    const softmax_stats ab = softmax_merge(a, b), ba = softmax_merge(b, a);
    INFO("trial " << trial << ": maxes " << a.max << ", " << b.max << ", " << c.max);
    REQUIRE(same_bits(l.max, r.max));
    CHECK(ulp_distance(l.sum_exp, r.sum_exp) <= 4);
    CHECK(std::fabs(double(l.sum_exp_z) - double(r.sum_exp_z)) <= 8 * kU * zmax * double(l.sum_exp));
    CHECK(same_bits(ab.max, ba.max));
    CHECK(ulp_distance(ab.sum_exp, ba.sum_exp) <= 1);
    CHECK(std::fabs(double(ab.sum_exp_z) - double(ba.sum_exp_z)) <= 2 * kU * zmax * double(ab.sum_exp));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Compensated sums

template <class Acc>
float accumulate(const std::vector<float>& x) {
  Acc a;
  for (float v : x) a.add(v);
  return a.value();
}

double exact_sum(const std::vector<float>& x) {
  // Values here have exponents within a range that float64 adds exactly (or within 2^-53 relative).
  long double s = 0;
  for (float v : x) s += v;
  return double(s);
}

double abs_sum(const std::vector<float>& x) {
  double s = 0;
  for (float v : x) s += std::fabs(double(v));
  return s;
}

TEST_CASE("kahan_sum: many small values onto a large one", "[primitives][kahan]") {
  struct setup {
    float big, small_lo, small_hi;
    std::size_t count;
  };
  const setup setups[] = {
      {1.f, 1e-8f, 1e-8f, 1000000},       // each addend is below half an ulp of the sum: plain sum never moves
      {1.f, 5.9e-8f, 5.9e-8f, 1000000},   // just below half an ulp
      {-1.f, -1e-9f, -1e-9f, 100000},
      {1e4f, 0.f, 1e-3f, 200000},         // each addend loses most of its bits
      {-3e3f, -2e-4f, 1e-4f, 300000},     // mixed signs
      {1e6f, 0.01f, 0.07f, 100000},
  };
  std::mt19937_64 rng(0x5eed0101);
  for (const setup& st : setups) {
    std::uniform_real_distribution<float> small(st.small_lo, st.small_hi);
    std::vector<float> x = {st.big};
    for (std::size_t i = 0; i < st.count; ++i) x.push_back(st.small_lo == st.small_hi ? st.small_lo : small(rng));
    const double exact = exact_sum(x);
    const double kahan_err = std::fabs(double(accumulate<kahan_sum>(x)) - exact);
    const double plain_err = std::fabs(double(accumulate<plain_sum>(x)) - exact);
    INFO("big = " << st.big << ": exact " << exact << ", kahan error " << kahan_err << ", plain error " << plain_err);
    CHECK(plain_err > 0);
    CHECK(kahan_err <= 1e-3 * plain_err);
    CHECK(ulp_distance(accumulate<kahan_sum>(x), float(exact)) <= 1);
  }
}

TEST_CASE("kahan_sum: Neumaier compensation survives a larger addend", "[primitives][kahan]") {
  // Classic Kahan loses the 1s here; the Neumaier variant keeps them.
  CHECK(accumulate<kahan_sum>({1.f, 1e30f, 1.f, -1e30f}) == 2.f);
  CHECK(accumulate<plain_sum>({1.f, 1e30f, 1.f, -1e30f}) == 0.f);
  CHECK(accumulate<kahan_sum>({1e8f, 1.f, -1e8f}) == 1.f);
  CHECK(accumulate<kahan_sum>({}) == 0.f);
  CHECK(accumulate<kahan_sum>({3.5f}) == 3.5f);
}

TEST_CASE("kahan_sum: infinities and NaN behave as in a plain sum", "[primitives][kahan]") {
  const std::vector<std::vector<float>> rows = {
      {1.f, kInf}, {kInf, 1.f}, {-kInf, 2.f, 1e-9f}, {1e30f, kInf, -3.f}, {kMax, kMax}, {-kMax, -kMax, 1.f},
      {kInf, -kInf}, {1.f, kNaN, 2.f}, {kInf, kInf}};
  for (const std::vector<float>& x : rows) {
    const float want = accumulate<plain_sum>(x);
    const float got = accumulate<kahan_sum>(x);
    INFO("plain " << want << ", kahan " << got);
    if (want != want) {
      CHECK(std::isnan(got));
    } else {
      CHECK(got == want);
    }
  }
  kahan_sum a, b;
  a.add(1.f);
  a.add(1e-9f);
  b.add(kInf);
  a.add(b);
  CHECK(a.value() == kInf);
}

TEST_CASE("kahan_sum: merging two compensated sums keeps the compensation", "[primitives][kahan]") {
  std::mt19937_64 rng(0x5eed0102);
  std::uniform_real_distribution<float> small(0.f, 1e-3f);
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<float> x = {trial % 2 ? 1e4f : 5e3f};
    for (int i = 0; i < 50000; ++i) x.push_back(small(rng));
    std::shuffle(x.begin(), x.end(), rng);
    const std::size_t cut = std::size_t(rng() % (x.size() + 1));
    kahan_sum a, b;
    plain_sum pa, pb;
    for (std::size_t i = 0; i < x.size(); ++i) {
      (i < cut ? a : b).add(x[i]);
      (i < cut ? pa : pb).add(x[i]);
    }
    kahan_sum ab = a, ba = b;
    ab.add(b);
    ba.add(a);
    pa.add(pb);
    const double exact = exact_sum(x);
    INFO("trial " << trial << ", cut " << cut);
    CHECK(ulp_distance(ab.value(), float(exact)) <= 2);
    CHECK(ulp_distance(ba.value(), float(exact)) <= 2);
    CHECK(std::fabs(double(ab.value()) - exact) <= 1e-2 * std::fabs(double(pa.value()) - exact) + 2 * kU * exact);
  }
  // The other sum's compensation is carried over: here it is the whole result.
  kahan_sum big, neg;
  big.add(1e8f);
  big.add(3.f);  // 1e8 + 3 rounds back to 1e8 (ulp 8): the 3 lives in the compensation
  neg.add(-1e8f);
  neg.add(big);
  CHECK(neg.value() == 3.f);
  big.add(neg);
  CHECK(big.value() == float(1e8 + 6));  // 1e8 + 3 + 3, correctly rounded
  // Many parts merged in a tree.
  std::vector<float> x;
  for (int i = 0; i < 1 << 16; ++i) x.push_back(i == 0 ? 1e5f : 1e-4f * float(1 + i % 7));
  std::vector<kahan_sum> parts(64);
  for (std::size_t i = 0; i < x.size(); ++i) parts[i % parts.size()].add(x[i]);
  while (parts.size() > 1) {
    std::vector<kahan_sum> next;
    for (std::size_t i = 0; i < parts.size(); i += 2) {
      next.push_back(parts[i]);
      next.back().add(parts[i + 1]);
    }
    parts.swap(next);
  }
  CHECK(ulp_distance(parts[0].value(), float(exact_sum(x))) <= 2);
}

TEST_CASE("kahan_sum: the result does not depend on the order", "[primitives][kahan]") {
  std::mt19937_64 rng(0x5eed0103);
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  std::vector<float> x;
  for (int i = 0; i < 100000; ++i) x.push_back(float(uni(rng) * std::ldexp(1.0, int(rng() % 41) - 20)));
  const double exact = exact_sum(x), mass = abs_sum(x);
  const double n = double(x.size());
  // Neumaier: |error| <= 2u|S| + O(n u^2) sum|x|.
  const double bound = 2 * kU * std::fabs(exact) + 4 * n * kU * kU * mass;
  float first = 0;
  double plain_spread = 0;
  for (int perm = 0; perm < 8; ++perm) {
    std::shuffle(x.begin(), x.end(), rng);
    const float k = accumulate<kahan_sum>(x);
    if (perm == 0) first = k;
    INFO("permutation " << perm << ": kahan " << k << ", exact " << exact);
    CHECK(std::fabs(double(k) - exact) <= bound);
    CHECK(ulp_distance(k, first) <= 2);
    plain_spread = std::max(plain_spread, std::fabs(double(accumulate<plain_sum>(x)) - exact));
  }
  CHECK(plain_spread > bound);  // the test data is hard enough for a plain sum to fail it
}

TEST_CASE("plain_sum: an ordinary float sum with the same interface", "[primitives][kahan]") {
  std::mt19937_64 rng(0x5eed0104);
  std::uniform_real_distribution<float> uni(-10.f, 10.f);
  std::vector<float> x(1000);
  for (float& v : x) v = uni(rng);
  float s = 0;
  for (float v : x) s += v;
  CHECK(same_bits(accumulate<plain_sum>(x), s));
  plain_sum a, b;
  a.add(1.5f);
  b.add(2.25f);
  a.add(b);
  CHECK(a.value() == 3.75f);
}

// ---------------------------------------------------------------------------------------------------------------
// Argmax

argmax_state reference_argmax(const std::vector<float>& z) {
  // torch.argmax: the first NaN if any, else the first maximum.
  for (std::size_t i = 0; i < z.size(); ++i)
    if (z[i] != z[i]) return {z[i], std::int64_t(i)};
  argmax_state best;
  for (std::size_t i = 0; i < z.size(); ++i)
    if (best.index < 0 || z[i] > best.value) best = {z[i], std::int64_t(i)};
  return best;
}

bool same_argmax(const argmax_state& a, const argmax_state& b) {
  return a.index == b.index && (same_bits(a.value, b.value) || (a.value != a.value && b.value != b.value));
}

TEST_CASE("argmax: the first index wins on ties", "[primitives][argmax]") {
  const std::vector<float> z = {1.f, 3.f, 2.f, 3.f, -1.f, 3.f};
  argmax_state fwd, bwd;
  for (std::size_t i = 0; i < z.size(); ++i) fwd = argmax_push(fwd, z[i], std::int64_t(i));
  for (std::size_t i = z.size(); i-- > 0;) bwd = argmax_push(bwd, z[i], std::int64_t(i));
  CHECK(fwd.index == 1);
  CHECK(bwd.index == 1);
  CHECK(fwd.value == 3.f);
  // +0 and -0 tie.
  CHECK(argmax_push(argmax_push({}, 0.f, 4), -0.f, 2).index == 2);
  CHECK(argmax_push(argmax_push({}, -0.f, 4), 0.f, 2).index == 2);
  // A row of -inf still has an argmax: its first index, as in torch.
  argmax_state dead;
  for (std::int64_t i = 9; i >= 3; --i) dead = argmax_push(dead, -kInf, i);
  CHECK(dead.index == 3);
  CHECK(argmax_merge(argmax_state{}, argmax_state{-kInf, 7}).index == 7);
  CHECK(argmax_merge(argmax_state{-kInf, 7}, argmax_state{}).index == 7);
  CHECK(argmax_merge(argmax_state{}, argmax_state{}).index == -1);
}

TEST_CASE("argmax: NaN counts as the largest value", "[primitives][argmax]") {
  CHECK(argmax_merge({kNaN, 5}, {kInf, 1}).index == 5);
  CHECK(argmax_merge({kInf, 1}, {kNaN, 5}).index == 5);
  CHECK(argmax_merge({kNaN, 5}, {kNaN, 2}).index == 2);  // the first NaN
  CHECK(argmax_merge({kNaN, 2}, {kNaN, 5}).index == 2);
  CHECK(argmax_merge({kMax, 0}, {kNaN, 9}).index == 9);
  CHECK(std::isnan(argmax_merge({1.f, 0}, {kNaN, 9}).value));
  const std::vector<float> z = {1.f, kInf, kNaN, 2.f, kNaN};
  argmax_state s;
  for (std::size_t i = 0; i < z.size(); ++i) s = argmax_push(s, z[i], std::int64_t(i));
  CHECK(s.index == 2);
}

TEST_CASE("argmax: merge is associative and commutative on data with ties", "[primitives][argmax]") {
  std::mt19937_64 rng(0x5eed0201);
  const float pool[] = {0.f, -0.f, 1.f, 2.f, 2.f, 2.f, -kInf, kInf, kNaN, -1.f};
  for (int trial = 0; trial < 2000; ++trial) {
    const std::size_t n = 1 + std::size_t(rng() % 64);
    std::vector<float> z(n);
    const std::size_t pool_size = trial % 2 ? 10 : 6;  // half the rows without NaN or inf
    for (float& v : z) v = pool[rng() % pool_size];
    const argmax_state want = reference_argmax(z);

    std::vector<argmax_state> leaves;
    for (std::size_t i = 0; i < n; ++i) leaves.push_back({z[i], std::int64_t(i)});
    std::shuffle(leaves.begin(), leaves.end(), rng);
    argmax_state linear;
    for (const argmax_state& l : leaves) linear = argmax_merge(linear, l);
    // Random tree: repeatedly merge two random neighbours in a random argument order.
    std::vector<argmax_state> tree = leaves;
    while (tree.size() > 1) {
      const std::size_t k = std::size_t(rng() % (tree.size() - 1));
      tree[k] = rng() % 2 ? argmax_merge(tree[k], tree[k + 1]) : argmax_merge(tree[k + 1], tree[k]);
      tree.erase(tree.begin() + long(k) + 1);
    }
    INFO("trial " << trial << ", n = " << n);
    CHECK(same_argmax(linear, want));
    CHECK(same_argmax(tree[0], want));
    // Explicit triples.
    const argmax_state a = leaves[0], b = leaves[n / 2], c = leaves[n - 1];
    CHECK(same_argmax(argmax_merge(argmax_merge(a, b), c), argmax_merge(a, argmax_merge(b, c))));
    CHECK(same_argmax(argmax_merge(a, b), argmax_merge(b, a)));
  }
}

// The finaliser's merge of a row's split partials (epilogue/row_partial.hpp, split_rows::read): the partials in
// split order, whatever batches it loads them in, bit for bit, for every split count around its batch of 8.
TEST_CASE("split partials merge in split order, bit for bit", "[primitives][softmax]") {
  std::mt19937_64 rng(0x5eed0405);
  std::normal_distribution<float> logit(0.f, 4.f);
  for (std::int64_t splits = 1; splits <= 41; ++splits) {
    const std::int64_t rows = 3;
    std::vector<row_partial> partials(std::size_t(rows * splits));
    for (std::int64_t i = 0; i < rows * splits; ++i)
      for (int k = 0; k < 5; ++k)
        partials[std::size_t(i)].push(logit(rng), 0.5f, std::int32_t(i * 5 + k));
    std::vector<float> target_logit(std::size_t(rows), 1.5f);
    detail::split_rows source;
    source.partials = partials.data();
    source.splits = splits;
    source.target_logit = target_logit.data();
    for (std::int64_t row = 0; row < rows; ++row) {
      row_partial want = partials[std::size_t(row * splits)];
      for (std::int64_t s = 1; s < splits; ++s) want = merge(want, partials[std::size_t(row * splits + s)]);
      row_partial got;
      float z = 0.f;
      REQUIRE(source.read(row, 0, got, z));
      INFO("splits " << splits << ", row " << row);
      CHECK(same_stats(got.softmax, want.softmax));
      CHECK(same_bits(got.weighted_logit_sum, want.weighted_logit_sum));
      CHECK(same_bits(got.argmax_value, want.argmax_value));
      CHECK(got.argmax_index == want.argmax_index);
      CHECK(z == 1.5f);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Logit transform

double transform_ref(double raw, double k, double inv_t) { return (k > 0 ? k * std::tanh(raw / k) : raw) * inv_t; }

TEST_CASE("logit_transform: identity without softcap and temperature", "[primitives][transform]") {
  const logit_transform id{};
  std::mt19937_64 rng(0x5eed0301);
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  for (int i = 0; i < 1000; ++i) {
    const float raw = float(uni(rng) * std::ldexp(1.0, int(rng() % 60) - 30));
    CHECK(same_bits(id(raw), raw));
    CHECK(id.derivative(raw) == 1.f);
    CHECK(id.derivative_from_logit(raw) == 1.f);
  }
  CHECK(id(kMax) == kMax);
  CHECK(id(-kInf) == -kInf);
  // Temperature alone scales.
  const logit_transform temp{0.f, 1.f / 0.7f};
  for (float raw : {-3.f, 0.f, 2.5f, 1e4f}) {
    CHECK(temp(raw) == raw * (1.f / 0.7f));
    CHECK(temp.derivative(raw) == 1.f / 0.7f);
    CHECK(temp.derivative_from_logit(temp(raw)) == 1.f / 0.7f);
  }
}

TEST_CASE("logit_transform: softcap and temperature match float64, derivatives match finite differences",
          "[primitives][transform]") {
  std::mt19937_64 rng(0x5eed0302);
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  const float caps[] = {5.f, 30.f, 50.f};
  const float temps[] = {1.f, 0.5f, 2.f, 0.7f};
  for (float k : caps) {
    for (float temp : temps) {
      const logit_transform tf{k, 1.f / temp};
      const double inv_t = double(tf.inv_temperature);
      for (int i = 0; i < 2000; ++i) {
        const float raw = float(uni(rng) * 4 * k);
        INFO("softcap " << k << ", T " << temp << ", raw " << raw);
        const double z_ref = transform_ref(raw, k, inv_t);
        CHECK(std::fabs(double(tf(raw)) - z_ref) <= 4 * kU * (std::fabs(z_ref) + k * inv_t * 1e-3));
        // Fourth-order central difference of the float64 map.
        const double h = 1e-3 * k;
        const double fd = (-transform_ref(raw + 2 * h, k, inv_t) + 8 * transform_ref(raw + h, k, inv_t) -
                           8 * transform_ref(raw - h, k, inv_t) + transform_ref(raw - 2 * h, k, inv_t)) /
                          (12 * h);
        CHECK(std::fabs(double(tf.derivative(raw)) - fd) <= 8 * kU * inv_t);
        // From the (float) logit: 1 - t^2 with t = zT/k loses a few ulps of t near saturation.
        CHECK(std::fabs(double(tf.derivative_from_logit(tf(raw))) - fd) <= 16 * kU * inv_t);
        CHECK(std::fabs(double(tf.derivative_from_logit(tf(raw))) - double(tf.derivative(raw))) <= 16 * kU * inv_t);
      }
    }
  }
}

TEST_CASE("logit_transform: extreme raw values saturate to +-k/T with zero slope", "[primitives][transform]") {
  for (float k : {5.f, 30.f, 50.f}) {
    for (float temp : {1.f, 2.f, 0.5f}) {
      const logit_transform tf{k, 1.f / temp};
      const float limit = k * (1.f / temp);
      for (float raw : {1e4f, -1e4f, 1e30f, -1e30f, kMax, -kMax, kInf, -kInf}) {
        INFO("softcap " << k << ", T " << temp << ", raw " << raw);
        const float z = tf(raw);
        CHECK(std::fabs(double(z) - (raw > 0 ? limit : -limit)) <= 2 * kU * limit);
        const float d = tf.derivative(raw), dz = tf.derivative_from_logit(z);
        CHECK(std::isfinite(d));
        CHECK(std::isfinite(dz));
        CHECK(std::fabs(d) <= 1e-6f);
        CHECK(std::fabs(dz) <= 1e-6f);
      }
    }
  }
  // Without softcap, large values pass through scaled.
  const logit_transform tf{0.f, 0.5f};
  CHECK(tf(1e4f) == 5e3f);
  CHECK(tf(-1e4f) == -5e3f);
}

// ---------------------------------------------------------------------------------------------------------------
// Per-row loss and logit-gradient coefficients

struct row_case {
  std::vector<double> z, w;
  std::size_t y = 0;
  double smoothing = 0, z_loss = 0, g = 1;
  bool weighted = false;
};

double lse_of(const std::vector<double>& z) {
  const double m = *std::max_element(z.begin(), z.end());
  double s = 0;
  for (double v : z) s += std::exp(v - m);
  return m + std::log(s);
}

// design.md: (1-eps) w_y (lse - z_y) + (eps/V) sum_v w_v (lse - z_v) + lambda lse^2.
double loss_formula(const row_case& c, const std::vector<double>& z) {
  const double lse = lse_of(z), v = double(z.size());
  double smooth = 0;
  for (std::size_t i = 0; i < z.size(); ++i) smooth += c.w[i] * (lse - z[i]);
  return (1 - c.smoothing) * c.w[c.y] * (lse - z[c.y]) + c.smoothing / v * smooth + c.z_loss * lse * lse;
}

loss_terms terms_of(const row_case& c) {
  loss_terms t;
  t.smoothing = float(c.smoothing);
  t.z_loss = float(c.z_loss);
  t.inv_classes = 1.f / float(c.z.size());
  double w_total = 0;
  for (double w : c.w) w_total += w;
  t.weight_total = float(w_total);
  return t;
}

// row_loss fed with float64 statistics of z (rounded once to float).
double row_loss_of(const row_case& c, const std::vector<double>& z) {
  double weighted = 0;
  for (std::size_t i = 0; i < z.size(); ++i) weighted += c.w[i] * z[i];
  return double(terms_of(c).row_loss(float(lse_of(z)), float(lse_of(z) - z[c.y]), float(c.w[c.y]), float(weighted)));
}

std::vector<row_case> random_row_cases(std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> gauss(0.0, 2.0);
  std::uniform_real_distribution<double> wdist(0.1, 2.0);
  std::vector<row_case> cases;
  for (double smoothing : {0.0, 0.1, 0.35, 1.0}) {
    for (double z_loss : {0.0, 1e-4, 0.05}) {
      for (bool weighted : {false, true}) {
        for (double g : {1.0, 0.37, -2.5, 1.0 / 4096}) {
          row_case c;
          const std::size_t v = 2 + std::size_t(rng() % 30);
          for (std::size_t i = 0; i < v; ++i) {
            c.z.push_back(double(float(gauss(rng))));
            c.w.push_back(weighted ? double(float(wdist(rng))) : 1.0);
          }
          c.y = std::size_t(rng() % v);
          c.smoothing = double(float(smoothing));
          c.z_loss = double(float(z_loss));
          c.g = double(float(g));
          c.weighted = weighted;
          cases.push_back(c);
        }
      }
    }
  }
  return cases;
}

TEST_CASE("row_loss: equals the design formula in float64", "[primitives][row_loss]") {
  for (const row_case& c : random_row_cases(0x5eed0401)) {
    const double want = loss_formula(c, c.z);
    const double got = row_loss_of(c, c.z);
    const double lse = lse_of(c.z);
    double w_total = 0, abs_weighted = 0;
    for (std::size_t i = 0; i < c.z.size(); ++i) {
      w_total += c.w[i];
      abs_weighted += c.w[i] * std::fabs(c.z[i]);
    }
    // Scale of the rounding: every term in magnitude.
    const double scale = std::fabs((1 - c.smoothing) * c.w[c.y]) * (std::fabs(lse) + std::fabs(c.z[c.y])) +
                         c.smoothing / double(c.z.size()) * (w_total * std::fabs(lse) + abs_weighted) +
                         c.z_loss * lse * lse;
    INFO("V = " << c.z.size() << ", eps = " << c.smoothing << ", lambda = " << c.z_loss
                << ", weighted = " << c.weighted);
    CHECK(std::fabs(got - want) <= 8 * kU * scale);
  }
  // Pure cross-entropy: lse - z_y exactly as float arithmetic.
  const loss_terms plain{0.f, 0.f, 1.f / 3, 3.f};
  CHECK(plain.row_loss(2.5f, 1.5f, 1.f, 123.f) == 1.5f);
  CHECK(plain.row_loss(2.5f, 1.5f, 2.f, 123.f) == 3.f);
  // Full smoothing: only the uniform term remains.
  const loss_terms uniform{1.f, 0.f, 0.25f, 4.f};
  CHECK(uniform.row_loss(2.f, -98.f, 1.f, 6.f) == Approx(0.25 * (4 * 2 - 6)));
  // z-loss alone.
  const loss_terms zl{0.f, 0.5f, 0.5f, 2.f};
  CHECK(zl.row_loss(3.f, 0.f, 1.f, 0.f) == 4.5f);
}

TEST_CASE("dlogit coefficients: the gradient of row_loss with respect to the logits", "[primitives][row_loss]") {
  for (const row_case& c : random_row_cases(0x5eed0402)) {
    const loss_terms terms = terms_of(c);
    const double lse = lse_of(c.z);
    const dlogit_coefficients coef = make_dlogit_coefficients(terms, float(c.g), float(lse), float(c.w[c.y]),
                                                              float(std::exp(c.z[c.y] - lse) - 1));
    const std::size_t v = c.z.size();
    double w_total = 0;
    for (double w : c.w) w_total += w;

    double dz_sum = 0, dz_abs = 0;
    // Rounding scale of one row_loss evaluation (every term in magnitude) and of its fifth derivative.
    double abs_weighted = 0;
    for (std::size_t i = 0; i < v; ++i) abs_weighted += c.w[i] * std::fabs(c.z[i]);
    const double loss_scale = (1 - c.smoothing) * c.w[c.y] * (std::fabs(lse) + std::fabs(c.z[c.y])) +
                              c.smoothing / double(v) * (w_total * std::fabs(lse) + abs_weighted) +
                              c.z_loss * lse * lse + 1e-30;
    const double curvature = (1 - c.smoothing) * c.w[c.y] + c.smoothing / double(v) * w_total +
                             c.z_loss * (std::fabs(lse) + 1);
    for (std::size_t i = 0; i < v; ++i) {
      const double p = std::exp(c.z[i] - lse);
      const float dz = coef(float(p), i == c.y, float(c.w[i]));
      dz_sum += double(dz);
      // Analytic (design.md), float64.
      const double want = c.g * ((1 - c.smoothing) * c.w[c.y] * (p - (i == c.y ? 1.0 : 0.0)) +
                                 c.smoothing / double(v) * (w_total * p - c.w[i]) + 2 * c.z_loss * lse * p);
      const double scale = std::fabs(c.g) * ((1 - c.smoothing) * c.w[c.y] * (p + 1) +
                                             c.smoothing / double(v) * (w_total * p + c.w[i]) +
                                             2 * c.z_loss * std::fabs(lse) * p);
      dz_abs += scale;
      INFO("V = " << v << ", class " << i << (i == c.y ? " (target)" : "") << ", eps = " << c.smoothing
                  << ", lambda = " << c.z_loss << ", weighted = " << c.weighted << ", g = " << c.g);
      CHECK(std::fabs(double(dz) - want) <= 8 * kU * scale);

      // Fourth-order central difference of row_loss, whose statistics come from float64 lse of the perturbed row.
      const double h = 0.05;
      auto at = [&](double delta) {
        std::vector<double> z = c.z;
        z[i] += delta;
        return row_loss_of(c, z);
      };
      const double fd = c.g * (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h);
      // The float rounding of each loss evaluation amplified by 1/h, plus the O(h^4) truncation.
      const double tol = std::fabs(c.g) * (2 * 4 * kU * loss_scale / h + 1e-6 * curvature);
      CHECK(std::fabs(double(dz) - fd) <= tol);
    }
    // sum_v p_v = 1 leaves only the z-loss term: sum_v dz_v = 2 g lambda lse.
    CHECK(std::fabs(dz_sum - 2 * c.g * c.z_loss * lse) <= 8 * kU * dz_abs);
  }
}

TEST_CASE("dlogit coefficients: closed form of ce, extra and gamma", "[primitives][row_loss]") {
  const loss_terms t{0.1f, 0.01f, 0.25f, 6.f};
  const dlogit_coefficients c = make_dlogit_coefficients(t, 2.f, 3.f, 1.5f, -0.5f);
  CHECK(c.ce == Approx(2 * 0.9 * 1.5));
  CHECK(c.gamma == Approx(2 * 0.1 * 0.25));
  CHECK(c.extra == Approx(2 * 0.1 * 0.25 * 6 + 2 * 2 * 0.01 * 3));
  CHECK(c(0.5f, false, 2.f) == Approx((c.ce + c.extra) * 0.5 - c.gamma * 2));
  CHECK(c(0.5f, true, 2.f) == Approx((c.ce + c.extra) * 0.5 - c.gamma * 2 - c.ce));
  // A saturated target row: the residual p_y - 1 is used as given, so the tiny result keeps its relative accuracy.
  const dlogit_coefficients sat = make_dlogit_coefficients(loss_terms{0.f, 0.f, 1.f, 1.f}, 1.f, 0.f, 1.f, -3e-9f);
  CHECK(sat(1.f, true, 1.f) == -3e-9f);
  // Zero upstream gradient: every coefficient is zero.
  const dlogit_coefficients z = make_dlogit_coefficients(t, 0.f, 3.f, 1.5f, -0.7f);
  CHECK(z(0.3f, true, 1.f) == 0.f);
  CHECK(z(0.3f, false, 1.f) == 0.f);
}

// ---------------------------------------------------------------------------------------------------------------
// Gradient filter

TEST_CASE("filter::mass_threshold: skips exactly below tile_cols * p_max * n_tiles < eps", "[primitives][filter]") {
  const float epss[] = {filter::auto_eps<__nv_bfloat16>(), filter::auto_eps<__half>(), filter::auto_eps<float>(),
                        1e-3f, 0.5f};
  const long long tile_cols[] = {16, 64, 128, 256};
  const long long tiles[] = {1, 7, 2000, 1000000};
  std::mt19937_64 rng(0x5eed0501);
  std::uniform_real_distribution<double> uni(-60.0, 5.0);
  for (float eps : epss) {
    for (long long tc : tile_cols) {
      for (long long nt : tiles) {
        const filter::mass_threshold f = filter::mass_threshold::make(eps, tc, nt);
        const double boundary = std::log(double(eps) / (double(tc) * double(nt)));
        const double delta = 1e-5 * std::max(1.0, std::fabs(boundary));
        INFO("eps " << eps << ", tile cols " << tc << ", tiles " << nt << ", boundary log p " << boundary);
        CHECK(f.skip(float(boundary - delta)));
        CHECK_FALSE(f.skip(float(boundary + delta)));
        CHECK(f.skip(-kInf));
        CHECK_FALSE(f.skip(0.f));
        CHECK_FALSE(f.skip(kNaN));  // an unknown bound never skips
        for (int i = 0; i < 200; ++i) {
          const double lp = double(float(uni(rng)));
          if (std::fabs(lp - boundary) <= delta) continue;
          CHECK(f.skip(float(lp)) == (double(tc) * std::exp(lp) * double(nt) < double(eps)));
        }
      }
    }
  }
}

// The second rule: a tile whose split the budget takes is skipped whatever its maximum says. The budget: eps for a
// whole vocabulary, a shard's part (eps col_tiles / n_tiles) otherwise, eps / n_tiles reserved per tile the first rule
// skips; a split's cost is its mass and its target's against lse_others, less its own tiles' reserve; NaN fails.
TEST_CASE("filter::split_budget: a row's drop under eps, shards' parts adding up to it", "[primitives][filter]") {
  std::mt19937_64 rng(0x5eed0502);
  std::uniform_real_distribution<double> uni(-40.0, 2.0);
  for (float eps : {filter::auto_eps<__nv_bfloat16>(), filter::auto_eps<float>(), 1e-3f}) {
    for (long long nt : {1LL, 19LL, 2000LL}) {
      const filter::mass_threshold f = filter::mass_threshold::make(eps, 128, nt);
      INFO("eps " << eps << ", tiles " << nt);
      CHECK(f.skip(0.f, true));
      CHECK(f.skip(kNaN, true));
      CHECK_FALSE(f.skip(0.f, false));
      const filter::split_budget whole = filter::split_budget::make(eps, nt, nt);
      CHECK(double(whole.row_mass) == Approx(double(eps)).epsilon(1e-6));
      CHECK(double(whole.tile_mass) == Approx(double(eps) / double(nt)).epsilon(1e-6));
      CHECK(whole.admits(0.f));
      CHECK(whole.admits(whole.row_mass));
      CHECK_FALSE(whole.admits(std::nextafter(whole.row_mass, kInf)));
      CHECK_FALSE(whole.admits(kNaN));
      CHECK_FALSE(whole.admits(kInf));
      // Shards of nt / 4 tiles each (their n_tiles counts every other class as a tile): parts add up to under eps.
      const long long part = std::max(1LL, nt / 4), shards = (nt + part - 1) / part;
      double total = 0.0;
      for (long long k = 0; k < shards; ++k) {
        const long long mine = std::min(part, nt - k * part), others = 128 * (nt - mine);
        total += double(filter::split_budget::make(eps, mine, mine + others).row_mass);
      }
      CHECK(total <= double(eps) * (1.0 + 1e-6));
      for (int i = 0; i < 200; ++i) {
        const double mass = double(float(uni(rng))), target = double(float(uni(rng))), lse = double(float(uni(rng)));
        const int first_rule = int(rng() % 4);
        const double terms[3] = {std::exp(mass - lse), std::exp(target - lse), double(whole.tile_mass) * first_rule};
        const double want = terms[0] + terms[1] - terms[2];  // float rounding: relative to the terms, not the sum
        CHECK(double(whole.cost(float(mass), float(target), float(lse), first_rule)) ==
              Approx(want).epsilon(0).margin(1e-5 * (terms[0] + terms[1] + terms[2])));
      }
      CHECK(double(whole.cost(-20.f, -kInf, 0.f, 0)) == Approx(std::exp(-20.0)).epsilon(1e-5));
      CHECK(std::isnan(whole.cost(kNaN, -kInf, 0.f, 0)));
      CHECK_FALSE(whole.admits(whole.cost(0.f, -kInf, -kInf, 0)));  // no other class: never skipped
    }
  }
  CHECK(filter::split_budget::make(0.f, 10, 10).row_mass == 0.f);
}

TEST_CASE("filter: eps = 0 and filter::none never skip", "[primitives][filter]") {
  const filter::mass_threshold zero = filter::mass_threshold::make(0.f, 128, 1000);
  const filter::none none{};
  for (float lp : {-kInf, -kMax, -1e30f, -1e4f, -100.f, 0.f, kNaN}) {
    CHECK_FALSE(zero.skip(lp));
    CHECK_FALSE(none.skip(lp));
  }
  CHECK_FALSE(filter::mass_threshold{}.skip(-kInf));
}

TEST_CASE("filter: a uniform softmax is never skipped, a peaked one is", "[primitives][filter]") {
  const long long tc = 128;
  std::vector<long long> vocab;
  for (long long v = 1; v <= 2048; ++v) vocab.push_back(v);
  for (double v = 2048; v <= 1e6; v *= 1.01) vocab.push_back((long long)v);
  for (long long k : {1000LL, 2000LL, 7812LL}) {
    vocab.push_back(k * tc - 1);
    vocab.push_back(k * tc);
    vocab.push_back(k * tc + 1);
  }
  vocab.push_back(1000000);
  for (long long v : vocab) {
    const long long nt = detail::ceil_div(v, tc);
    // Every logit 0: the forward's tile max is 0 and lse = log V, both in float.
    const float log_p_max = 0.f - float(std::log(double(v)));
    for (float eps : {filter::auto_eps<__nv_bfloat16>(), filter::auto_eps<__half>(), filter::auto_eps<float>()}) {
      const filter::mass_threshold f = filter::mass_threshold::make(eps, tc, nt);
      INFO("V = " << v << ", eps = " << eps);
      CHECK_FALSE(f.skip(log_p_max));
    }
  }
  // A confident row of a 256000-class head: a tile at 40 nats below the lse is negligible.
  const long long nt = detail::ceil_div(256000, tc);
  CHECK(filter::mass_threshold::make(filter::auto_eps<__nv_bfloat16>(), tc, nt).skip(-40.f));
  CHECK_FALSE(filter::mass_threshold::make(filter::auto_eps<__nv_bfloat16>(), tc, nt).skip(-20.f));
}

TEST_CASE("filter::near_uniform: every probability within (1 + tolerance) / V", "[primitives][filter]") {
  for (long long v : {1LL, 7LL, 32000LL, 256000LL}) {
    const float tol = 1.f / 16;
    const filter::near_uniform f = filter::near_uniform::make(tol, v);
    const float log_v = float(std::log(double(v)));
    INFO("V = " << v);
    for (float lse : {-50.f, 0.f, 3.7f, 80.f}) {  // without a softcap only z_max - lse counts
      CHECK(f.holds(lse - log_v, lse));                                        // p = 1/V
      CHECK(f.holds(lse + float(std::log1p(0.9 * tol)) - log_v, lse));         // just inside
      CHECK_FALSE(f.holds(lse + float(std::log1p(1.1 * tol)) - log_v, lse));  // just outside
    }
    CHECK_FALSE(f.holds(std::nanf(""), 0.f));
    CHECK_FALSE(f.holds(0.f, std::nanf("")));
    CHECK_FALSE(filter::near_uniform::make(0.f, v).holds(-log_v, 0.f));  // disabled
  }
}

TEST_CASE("filter::near_uniform with a softcap: 3/4 of the tolerance, and a factor near 1 where the mass is",
          "[primitives][filter]") {
  const float tol = 1.f / 16, cap = 30.f;  // |z| <= cap sqrt(tol) / 2 = 3.75 over [z* - 2, z_max]
  const long long v = 50304;
  const float log_v = float(std::log(double(v)));
  const filter::near_uniform f = filter::near_uniform::make(tol, v, cap);
  const auto row = [&](float z_flat, double deviation) {  // z* = lse - log V, z_max = z* + log1p(deviation)
    return f.holds(z_flat + float(std::log1p(deviation)), z_flat + log_v);
  };
  CHECK(row(0.f, 0.0));
  CHECK(row(0.f, 0.9 * 0.75 * tol));
  CHECK_FALSE(row(0.f, 1.1 * 0.75 * tol));    // inside the tolerance, outside 3/4 of it
  CHECK(row(-1.7f, 0.0));                     // z* - 2 = -3.7
  CHECK_FALSE(row(-1.8f, 0.0));               // z* - 2 = -3.8: the factor drops below 1 - tol / 4 there
  CHECK(row(3.7f, 0.0));                      // z_max = 3.7
  CHECK_FALSE(row(3.74f, 0.9 * 0.75 * tol));  // z_max = 3.78
  CHECK_FALSE(f.holds(std::nanf(""), 0.f));
  // A cap far above the logits takes a flat row wherever its logits lie.
  CHECK(filter::near_uniform::make(tol, v, 1e30f).holds(20.f, 20.f + log_v));
}

TEST_CASE("filter::near_uniform_linear: 1 - kappa within 2 tolerance, less the softcap's terms under a cap",
          "[primitives][filter]") {
  const float tol = 1.f / 16;
  const long long v = 32000;
  const float log_v = float(std::log(double(v)));
  const auto kappa_row = [&](const filter::near_uniform_linear& f, double one_minus_kappa, float bound) {
    const float lse = 1.5f;  // zbar = lse - log V + log kappa
    return f.holds(lse - log_v + float(std::log1p(-one_minus_kappa)), lse, bound);
  };
  const filter::near_uniform_linear plain = filter::near_uniform_linear::make(tol, v);
  CHECK(kappa_row(plain, 0.0, 0.f));
  CHECK(kappa_row(plain, 0.99 * 2 * tol, 1e30f));  // the bound counts only under a cap
  CHECK_FALSE(kappa_row(plain, 1.01 * 2 * tol, 0.f));
  CHECK_FALSE(plain.holds(std::nanf(""), 0.f));

  const float cap = 2.f;
  const filter::near_uniform_linear f = filter::near_uniform_linear::make(tol, v, cap);
  CHECK(f.softcap_drop(0.f) == 0.f);
  // bound 0.4: x2 = 0.04, delta = 0.4 x2 / 3; the drop is 2 delta e^delta + delta + 2 x2, about 0.0907
  const double x2 = 0.04, delta = 0.4 * x2 / 3, drop = 2 * delta * std::exp(delta) + delta + 2 * x2;
  CHECK(double(f.softcap_drop(0.4f)) == Approx(drop).epsilon(1e-5));
  CHECK(kappa_row(f, 0.0, 0.f));
  CHECK(kappa_row(f, 0.99 * (2 * tol - drop), 0.4f));
  CHECK_FALSE(kappa_row(f, 1.01 * (2 * tol - drop), 0.4f));
  CHECK_FALSE(kappa_row(f, 0.0, 0.6f));  // the softcap's terms alone exceed 2 tolerance
  CHECK_FALSE(kappa_row(f, 0.0, std::nanf("")));
  CHECK_FALSE(kappa_row(f, 0.0, INFINITY));
  // Even a flat row keeps out where the logits may reach the cap's curvature.
  CHECK_FALSE(kappa_row(filter::near_uniform_linear::make(filter::auto_eps<__nv_bfloat16>() / 2, v, 30.f), 0.0, 1.f));
}

TEST_CASE("filter::auto_eps: machine epsilon of the element type / 32", "[primitives][filter]") {
  CHECK(filter::auto_eps<__nv_bfloat16>() == std::ldexp(1.f, -12));
  CHECK(filter::auto_eps<__half>() == std::ldexp(1.f, -15));
  CHECK(filter::auto_eps<float>() == std::ldexp(1.f, -28));
  static_assert(filter::auto_eps<float>() > 0.f, "auto_eps is a constant expression");
}

// ---------------------------------------------------------------------------------------------------------------
// Tile arithmetic

void check_grid_partition(const tile::tile_grid& g) {
  std::int64_t rows = 0, cols = 0;
  for (std::int64_t i = 0; i < g.row_tiles(); ++i) {
    REQUIRE(g.row_begin(i) == rows);
    REQUIRE(g.rows_in(i) >= 1);
    REQUIRE(g.rows_in(i) <= g.bm);
    if (i + 1 < g.row_tiles()) REQUIRE(g.rows_in(i) == g.bm);
    rows += g.rows_in(i);
  }
  for (std::int64_t j = 0; j < g.col_tiles(); ++j) {
    REQUIRE(g.col_begin(j) == cols);
    REQUIRE(g.cols_in(j) >= 1);
    REQUIRE(g.cols_in(j) <= g.bn);
    if (j + 1 < g.col_tiles()) REQUIRE(g.cols_in(j) == g.bn);
    cols += g.cols_in(j);
  }
  CHECK(rows == g.rows);
  CHECK(cols == g.cols);
  CHECK(g.tiles() == g.row_tiles() * g.col_tiles());
}

TEST_CASE("tile_grid: 64-bit tiles, partial last tiles, exact cover", "[primitives][tile]") {
  constexpr std::int64_t two31 = std::int64_t(1) << 31, two32 = std::int64_t(1) << 32;
  SECTION("65536 x 256000, rows*cols > 2^32") {
    const tile::tile_grid g{65536, 256000, 128, 256};
    CHECK(g.rows * g.cols > two32);
    CHECK(g.row_tiles() == 512);
    CHECK(g.col_tiles() == 1000);
    CHECK(g.tiles() == 512000);
    CHECK(g.rows_in(511) == 128);
    CHECK(g.cols_in(999) == 256);
    // The last element's offset needs more than 32 bits.
    const std::int64_t last =
        tile::offset(g.row_begin(511) + g.rows_in(511) - 1, g.col_begin(999) + g.cols_in(999) - 1, g.cols);
    CHECK(last == std::int64_t(65536) * 256000 - 1);
    CHECK(last > two32);
    check_grid_partition(g);
  }
  SECTION("46341 x 46341, rows*cols just over 2^31") {
    const tile::tile_grid g{46341, 46341, 64, 128};
    CHECK(g.rows * g.cols > two31);
    CHECK(g.rows * g.cols < two32);
    CHECK(g.row_tiles() == 725);    // 724 * 64 = 46336
    CHECK(g.rows_in(724) == 5);
    CHECK(g.col_tiles() == 363);    // 362 * 128 = 46336
    CHECK(g.cols_in(362) == 5);
    CHECK(tile::offset(46340, 46340, 46341) == std::int64_t(46341) * 46341 - 1);
    check_grid_partition(g);
  }
  SECTION("partial last tiles") {
    const tile::tile_grid g{100003, 256001, 128, 256};
    CHECK(g.row_tiles() == 782);
    CHECK(g.rows_in(781) == 100003 - 781 * 128);
    CHECK(g.col_tiles() == 1001);
    CHECK(g.cols_in(1000) == 1);
    check_grid_partition(g);
  }
  SECTION("more than 2^32 tiles and elements beyond 2^40") {
    const tile::tile_grid g{std::int64_t(1) << 22, (std::int64_t(1) << 21) + 3, 16, 16};
    CHECK(g.row_tiles() == std::int64_t(1) << 18);
    CHECK(g.col_tiles() == (std::int64_t(1) << 17) + 1);
    CHECK(g.tiles() == (std::int64_t(1) << 35) + (std::int64_t(1) << 18));
    CHECK(g.cols_in(g.col_tiles() - 1) == 3);
    CHECK(g.row_begin(g.row_tiles() - 1) == (std::int64_t(1) << 22) - 16);
    CHECK(tile::offset(g.rows - 1, g.cols - 1, g.cols) == g.rows * g.cols - 1);
  }
  SECTION("random shapes") {
    std::mt19937_64 rng(0x5eed0601);
    for (int trial = 0; trial < 300; ++trial) {
      const tile::tile_grid g{1 + std::int64_t(rng() % 3000), 1 + std::int64_t(rng() % 5000),
                              1 + std::int64_t(rng() % 200), 1 + std::int64_t(rng() % 300)};
      INFO(g.rows << " x " << g.cols << " in " << g.bm << " x " << g.bn);
      check_grid_partition(g);
    }
  }
  SECTION("offset with a padded leading dimension") {
    CHECK(tile::offset(0, 0, 4096) == 0);
    CHECK(tile::offset(3, 5, 4104) == 3 * 4104 + 5);
    CHECK(tile::offset(262143, 4095, 4104) == std::int64_t(262143) * 4104 + 4095);
    CHECK(tile::offset(262143, 4095, 4104) > two32 / 4);
    CHECK(tile::offset(1999999, 8191, 8200) > two32);
  }
  CHECK(detail::ceil_div(0, 5) == 0);
  CHECK(detail::ceil_div(10, 5) == 2);
  CHECK(detail::ceil_div(11, 5) == 3);
  CHECK(detail::ceil_div(two32 + 1, 2) == two31 + 1);
  CHECK(detail::round_up(11, 8) == 16);
  CHECK(detail::round_up(two32 - 1, 256) == two32);
}

TEST_CASE("split_begin: exact partition with sizes differing by at most one", "[primitives][tile]") {
  std::mt19937_64 rng(0x5eed0602);
  std::vector<std::pair<std::int64_t, std::int64_t>> cases = {
      {0, 1}, {0, 7}, {1, 1}, {3, 10}, {10, 3}, {1000, 1000}, {1001, 1000},
      {std::int64_t(65536) * 256000, 132}, {(std::int64_t(1) << 33) + 5, 1024}, {(std::int64_t(1) << 40) - 1, 7}};
  for (int i = 0; i < 200; ++i) {
    const std::int64_t total = std::int64_t(rng() % (std::uint64_t(1) << (1 + rng() % 40)));
    cases.push_back({total, 1 + std::int64_t(rng() % 2000)});
  }
  for (const auto& [total, parts] : cases) {
    INFO("total " << total << ", parts " << parts);
    REQUIRE(tile::split_begin(total, parts, 0) == 0);
    REQUIRE(tile::split_begin(total, parts, parts) == total);
    std::int64_t lo = std::numeric_limits<std::int64_t>::max(), hi = 0, sum = 0;
    for (std::int64_t k = 0; k < parts; ++k) {
      const std::int64_t size = tile::split_begin(total, parts, k + 1) - tile::split_begin(total, parts, k);
      lo = std::min(lo, size);
      hi = std::max(hi, size);
      sum += size;
    }
    CHECK(sum == total);
    CHECK(lo >= 0);
    CHECK(hi - lo <= 1);
    CHECK(lo == total / parts);
  }
}

TEST_CASE("grouped_order: every output tile exactly once, groups of rows sweeping all columns", "[primitives][tile]") {
  const std::pair<int, int> shapes[] = {{1, 1}, {1, 16}, {8, 16}, {9, 16}, {63, 16}, {64, 16}, {128, 3}, {7, 1}, {17, 5}};
  for (const auto& [m_tiles, n_tiles] : shapes) {
    INFO(m_tiles << " x " << n_tiles << " tiles");
    std::vector<int> seen(std::size_t(m_tiles * n_tiles), 0);
    for (int block = 0; block < m_tiles * n_tiles; ++block) {
      const tile::grouped_order t(block, m_tiles, n_tiles, 8);
      REQUIRE(t.m >= 0);
      REQUIRE(t.m < m_tiles);
      REQUIRE(t.n >= 0);
      REQUIRE(t.n < n_tiles);
      ++seen[std::size_t(t.m * n_tiles + t.n)];
      CHECK(t.m / 8 == block / (8 * n_tiles));  // the group of a block is its row group
    }
    CHECK(std::count(seen.begin(), seen.end(), 1) == m_tiles * n_tiles);
  }
}

TEST_CASE("grouped_order: a group size outside [1, m_tiles] is taken into it", "[primitives][tile]") {
  for (const auto& [m_tiles, n_tiles] : {std::pair<int, int>{5, 7}, {64, 33}}) {
    for (int block = 0; block < m_tiles * n_tiles; ++block) {
      const tile::grouped_order none(block, m_tiles, n_tiles, 0), one(block, m_tiles, n_tiles, 1);
      const tile::grouped_order huge(block, m_tiles, n_tiles, 1 << 30), all(block, m_tiles, n_tiles, m_tiles);
      CHECK((none.m == one.m && none.n == one.n));
      CHECK((huge.m == all.m && huge.n == all.n));
    }
  }
}

TEST_CASE("l2_grouped_order: groups of rows whose tiles fill about 16 MiB, every tile once", "[primitives][tile]") {
  constexpr std::int64_t mib = std::int64_t(1) << 20;
  CHECK(tile::l2_row_group(mib) == 16);                      // llama3's E tile: 128 rows x 4,096 x bf16
  CHECK(tile::l2_row_group(128 * 2304 * 2) == 28);           // gemma2's
  CHECK(tile::l2_row_group(64 * mib) == 1);                  // a tile larger than the budget: one row tile
  CHECK(tile::l2_row_group(0) == tile::l2_row_group(1));     // degenerate depth
  CHECK(tile::l2_row_group(1) == std::int64_t(1) << 24);
  const std::int64_t bytes[] = {1, mib, 5 * mib, 64 * mib};
  for (const std::int64_t b : bytes) {
    for (const auto& [m_tiles, n_tiles] : {std::pair<int, int>{1, 1}, {64, 33}, {63, 16}, {17, 5}, {3, 200}}) {
      INFO(b << " bytes per row tile, " << m_tiles << " x " << n_tiles << " tiles");
      const int group = std::min(tile::l2_row_group(b), m_tiles);
      std::vector<int> seen(std::size_t(m_tiles * n_tiles), 0);
      for (int block = 0; block < m_tiles * n_tiles; ++block) {
        const tile::grouped_order t = tile::l2_grouped_order(block, m_tiles, n_tiles, b);
        REQUIRE(t.m >= 0);
        REQUIRE(t.m < m_tiles);
        REQUIRE(t.n >= 0);
        REQUIRE(t.n < n_tiles);
        ++seen[std::size_t(t.m * n_tiles + t.n)];
        CHECK(t.m / group == block / (group * n_tiles));
      }
      CHECK(std::count(seen.begin(), seen.end(), 1) == m_tiles * n_tiles);
    }
  }
}

TEST_CASE("tile::policy: derived constants", "[primitives][tile]") {
  using p = tile::policy<128, 256, 32, 3, 2, 4>;
  static_assert(p::bm == 128 && p::bn == 256 && p::bk == 32 && p::stages == 3, "shape");
  static_assert(p::warps == 8 && p::threads == 256, "warps");
  static_assert(p::warp_m == 64 && p::warp_n == 64, "per-warp tile");
  using q = tile::policy<64, 128, 64, 2, 1, 4>;
  CHECK(q::threads == 128);
  CHECK(q::warp_m == 64);
  CHECK(q::warp_n == 32);
}

// ---------------------------------------------------------------------------------------------------------------
// Element types

template <class T, class Raw>
T from_bits(std::uint16_t bits) {
  Raw r;
  r.x = bits;
  return T(r);
}

template <class T, class Raw>
std::uint16_t to_bits(T x) {
  const Raw r = x;
  return r.x;
}

// Exact value of an IEEE binary16 / bfloat16 bit pattern.
double decode(std::uint16_t bits, int exp_bits, int man_bits) {
  const int sign = bits >> 15, e = (bits >> man_bits) & ((1 << exp_bits) - 1), m = bits & ((1 << man_bits) - 1);
  const int bias = (1 << (exp_bits - 1)) - 1;
  double v;
  if (e == (1 << exp_bits) - 1)
    v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (e == 0)
    v = std::ldexp(double(m), 1 - bias - man_bits);
  else
    v = std::ldexp(double(m + (1 << man_bits)), e - bias - man_bits);
  return sign ? -v : v;
}

template <class T, class Raw>
void check_all_patterns(int exp_bits, int man_bits) {
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const std::uint16_t bits = std::uint16_t(b);
    const T x = from_bits<T, Raw>(bits);
    const float f = detail::to_float(x);
    const double want = decode(bits, exp_bits, man_bits);
    INFO("bits 0x" << std::hex << b);
    if (want != want) {
      REQUIRE(std::isnan(f));
      REQUIRE(std::isnan(detail::to_float(detail::from_float<T>(f))));
    } else {
      REQUIRE(double(f) == want);
      REQUIRE(std::signbit(f) == bool(bits >> 15));
      REQUIRE(to_bits<T, Raw>(detail::from_float<T>(f)) == bits);  // exact round trip, -0 included
    }
  }
}

template <class T, class Raw>
void check_rounding(std::mt19937_64& rng, double lo, double hi) {
  std::uniform_real_distribution<double> e(std::log2(lo), std::log2(hi));
  for (int i = 0; i < 20000; ++i) {
    const float f = float((rng() % 2 ? 1 : -1) * std::exp2(e(rng)));
    const T r = detail::from_float<T>(f);
    const double got = double(detail::to_float(r));
    INFO("f = " << f << ", rounded " << got);
    REQUIRE(std::fabs(got - double(f)) <= double(detail::unit_roundoff<T>()) * std::fabs(double(f)));
    // Nearest: neither neighbour is strictly closer.
    const std::uint16_t bits = to_bits<T, Raw>(r);
    for (int step : {-1, 1}) {
      const double other = double(detail::to_float(from_bits<T, Raw>(std::uint16_t(bits + step))));
      if (std::isfinite(other)) REQUIRE(std::fabs(other - double(f)) >= std::fabs(got - double(f)));
    }
  }
}

TEST_CASE("element_type: bf16 conversions", "[primitives][element]") {
  check_all_patterns<__nv_bfloat16, __nv_bfloat16_raw>(8, 7);
  std::mt19937_64 rng(0x5eed0701);
  check_rounding<__nv_bfloat16, __nv_bfloat16_raw>(rng, 1e-30, 1e30);
  using bf = __nv_bfloat16;
  for (float v :
       {0.f, 1.f, -1.f, 0.5f, 3.f, 10240.f, -0x1.3p-9f, 256.f, 3.3895313892515355e38f, 0x1p-133f, kInf, -kInf})
    CHECK(detail::to_float(detail::from_float<bf>(v)) == v);
  // Round to nearest, ties to even (ulp at 1 is 2^-7).
  CHECK(detail::to_float(detail::from_float<bf>(1.f + 0x1p-8f)) == 1.f);
  CHECK(detail::to_float(detail::from_float<bf>(1.f + 3 * 0x1p-8f)) == 1.f + 0x1p-6f);
  CHECK(detail::to_float(detail::from_float<bf>(1.f + 0x1p-8f + 0x1p-16f)) == 1.f + 0x1p-7f);
  CHECK(std::isnan(detail::to_float(detail::from_float<bf>(kNaN))));
  CHECK(std::isinf(detail::to_float(detail::from_float<bf>(kMax))));  // rounds past the largest bf16
}

TEST_CASE("element_type: fp16 conversions", "[primitives][element]") {
  check_all_patterns<__half, __half_raw>(5, 10);
  std::mt19937_64 rng(0x5eed0702);
  check_rounding<__half, __half_raw>(rng, 6.2e-5, 6.5e4);  // the normal range
  for (float v : {0.f, 1.f, -1.f, 0.5f, 3.f, 1024.f, -0x1.3p-9f, 65504.f, 0x1p-24f, 0x1p-14f, kInf, -kInf})
    CHECK(detail::to_float(detail::from_float<__half>(v)) == v);
  // Ties to even (ulp at 1 is 2^-10), overflow to inf, underflow to the smallest subnormal and to zero.
  CHECK(detail::to_float(detail::from_float<__half>(1.f + 0x1p-11f)) == 1.f);
  CHECK(detail::to_float(detail::from_float<__half>(1.f + 3 * 0x1p-11f)) == 1.f + 0x1p-9f);
  CHECK(detail::to_float(detail::from_float<__half>(65519.f)) == 65504.f);
  CHECK(std::isinf(detail::to_float(detail::from_float<__half>(65520.f))));
  CHECK(std::isinf(detail::to_float(detail::from_float<__half>(1e5f))));
  CHECK(detail::to_float(detail::from_float<__half>(0x1p-25f + 0x1p-30f)) == 0x1p-24f);
  CHECK(detail::to_float(detail::from_float<__half>(0x1p-26f)) == 0.f);
  CHECK(std::isnan(detail::to_float(detail::from_float<__half>(kNaN))));
}

TEST_CASE("element_type: float passes through; constants", "[primitives][element]") {
  for (float v : {0.f, -0.f, 1e-40f, kMax, -kInf}) {
    CHECK(same_bits(detail::to_float(v), v));
    CHECK(same_bits(detail::from_float<float>(v), v));
  }
  CHECK(std::isnan(detail::from_float<float>(kNaN)));
  CHECK(detail::unit_roundoff<__nv_bfloat16>() == std::ldexp(1.f, -8));
  CHECK(detail::unit_roundoff<__half>() == std::ldexp(1.f, -11));
  CHECK(detail::unit_roundoff<float>() == 1e-6f);  // 2^-24 floored at 1e-6
  CHECK(detail::element_traits<__nv_bfloat16>::epsilon == std::ldexp(1.f, -7));
  CHECK(detail::element_traits<__half>::epsilon == std::ldexp(1.f, -10));
  CHECK(detail::element_traits<float>::epsilon == std::numeric_limits<float>::epsilon());
  CHECK(std::string(detail::element_traits<__nv_bfloat16>::name) == "bf16");
  CHECK(std::string(detail::element_traits<__half>::name) == "fp16");
  CHECK(std::string(detail::element_traits<float>::name) == "fp32");
  static_assert(detail::is_supported_element_v<float> && detail::is_supported_element_v<__half> &&
                    detail::is_supported_element_v<__nv_bfloat16>,
                "the three element types");
  static_assert(!detail::is_supported_element_v<double> && !detail::is_supported_element_v<int>, "others");
}

}  // namespace
