// The float64 reference (cce::host::reference_forward / reference_backward) checked three ways:
//   (a) against a naive materialised implementation written below in a different style: the effective classifier
//       C + s*B*A is formed, the full logit matrix and log-softmax are built, the loss follows torch's
//       F.cross_entropy formulas and the gradients go through the chain rule of the materialised classifier;
//   (b) against central finite differences of the loss, for every gradient and every option combination;
//   (c) on edge cases: hand-computed values, invalid targets, every row ignored, strides, target types, shift,
//       bf16/fp16 rounding.
#include <catch2/catch.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <cce/host/reference.hpp>

namespace {

using cce::options;
using cce::problem;
using cce::reduction;
using cce::host::dense_problem;
using cce::host::reference_backward;
using cce::host::reference_forward;
using cce::host::reference_forward_result;
using cce::host::reference_gradients;

constexpr double nan_d = std::numeric_limits<double>::quiet_NaN();

// ---------------------------------------------------------------------------------------------------------------
// Element conversions, written here without the library's traits.

double as_double(float x) { return double(x); }
double as_double(__nv_bfloat16 x) { return double(__bfloat162float(x)); }
double as_double(__half x) { return double(__half2float(x)); }

template <class T>
T from_float(float x);
template <>
float from_float<float>(float x) { return x; }
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__half from_float<__half>(float x) { return __float2half_rn(x); }

// ---------------------------------------------------------------------------------------------------------------
// Random cases held in host memory. Padding elements of strided matrices hold NaN, so reading one poisons the
// results.

struct case_config {
  std::int64_t n = 1, d = 1, v = 1, rank = 0, seq_len = 0;
  std::int64_t e_pad = 0, c_pad = 0, a_pad = 0, b_pad = 0;
  bool bias = false, weights = false, int32_targets = false;
  double ignore_fraction = 0.0;
  float lora_scale = 1.f;
  float spread = 1.f;  // scale of E, so logits range over about +-spread*sqrt(d)
  std::uint64_t seed = 1;
  options opts{};

  std::string describe() const {
    std::ostringstream s;
    s << "n=" << n << " d=" << d << " v=" << v << " rank=" << rank << " seq_len=" << seq_len << " pads=" << e_pad
      << "," << c_pad << "," << a_pad << "," << b_pad << " bias=" << bias << " weights=" << weights
      << " int32=" << int32_targets << " ignore=" << ignore_fraction << " lora_scale=" << lora_scale
      << " spread=" << spread << " seed=" << seed << " | reduction=" << int(opts.reduction)
      << " softcap=" << opts.softcap << " T=" << opts.temperature << " smoothing=" << opts.label_smoothing
      << " z_loss=" << opts.z_loss << " shift=" << opts.shift << " ignore_index=" << opts.ignore_index;
    return s.str();
  }
};

template <class T>
struct host_case {
  case_config cfg;
  std::vector<T> e, c, bias, a, b;
  std::vector<float> weights;
  std::vector<std::int32_t> t32;
  std::vector<std::int64_t> t64;

  problem<T> view() const {
    problem<T> p;
    p.n = cfg.n;
    p.d = cfg.d;
    p.v = cfg.v;
    p.e = e.data();
    p.lde = cfg.e_pad ? cfg.d + cfg.e_pad : 0;
    p.c = c.data();
    p.ldc = cfg.c_pad ? cfg.d + cfg.c_pad : 0;
    p.targets = cfg.int32_targets ? static_cast<const void*>(t32.data()) : static_cast<const void*>(t64.data());
    p.targets_type = cfg.int32_targets ? cce::target_type::int32 : cce::target_type::int64;
    p.bias = cfg.bias ? bias.data() : nullptr;
    p.class_weights = cfg.weights ? weights.data() : nullptr;
    if (cfg.rank > 0) {
      p.lora.a = a.data();
      p.lora.b = b.data();
      p.lora.rank = cfg.rank;
      p.lora.lda = cfg.a_pad ? cfg.d + cfg.a_pad : 0;
      p.lora.ldb = cfg.b_pad ? cfg.rank + cfg.b_pad : 0;
      p.lora.scale = cfg.lora_scale;
    }
    p.seq_len = cfg.seq_len;
    return p;
  }

  void set_target(std::int64_t i, std::int64_t y) {
    t64[std::size_t(i)] = y;
    t32[std::size_t(i)] = std::int32_t(y);
  }
};

template <class T>
std::vector<T> random_matrix(std::mt19937_64& rng, std::int64_t rows, std::int64_t cols, std::int64_t pad,
                             float scale) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<T> m(std::size_t(rows * (cols + pad)), from_float<T>(std::numeric_limits<float>::quiet_NaN()));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t k = 0; k < cols; ++k) m[std::size_t(r * (cols + pad) + k)] = from_float<T>(scale * u(rng));
  return m;
}

template <class T>
host_case<T> make_case(const case_config& cfg) {
  host_case<T> h;
  h.cfg = cfg;
  std::mt19937_64 rng(cfg.seed);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  h.e = random_matrix<T>(rng, cfg.n, cfg.d, cfg.e_pad, cfg.spread);
  h.c = random_matrix<T>(rng, cfg.v, cfg.d, cfg.c_pad, 1.f);
  h.bias = random_matrix<T>(rng, 1, cfg.v, 0, 0.5f);
  h.a = random_matrix<T>(rng, cfg.rank, cfg.d, cfg.a_pad, 1.f);
  h.b = random_matrix<T>(rng, cfg.v, cfg.rank, cfg.b_pad, 1.f);
  for (std::int64_t k = 0; k < cfg.v; ++k) h.weights.push_back(float(0.2 + 1.8 * u01(rng)));
  h.t32.resize(std::size_t(cfg.n));
  h.t64.resize(std::size_t(cfg.n));
  for (std::int64_t i = 0; i < cfg.n; ++i) {
    const bool ignore = u01(rng) < cfg.ignore_fraction;
    const std::int64_t y = std::min<std::int64_t>(cfg.v - 1, std::int64_t(u01(rng) * double(cfg.v)));
    h.set_target(i, ignore ? cfg.opts.ignore_index : y);
  }
  return h;
}

// Upstream gradient: one value for mean and sum, one per row for none.
std::vector<double> make_grad(const case_config& cfg) {
  std::mt19937_64 rng(cfg.seed * 7919 + 17);
  std::uniform_real_distribution<double> u(-1.5, 1.5);
  std::vector<double> g(cfg.opts.reduction == reduction::none ? std::size_t(cfg.n) : 1);
  for (double& x : g) x = u(rng);
  return g;
}

// ---------------------------------------------------------------------------------------------------------------
// The naive materialised implementation, reading the problem's pointers directly.

using matrix = std::vector<std::vector<double>>;

template <class T>
matrix read_matrix(const T* p, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  matrix m(static_cast<std::size_t>(rows), std::vector<double>(static_cast<std::size_t>(cols)));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t k = 0; k < cols; ++k) m[std::size_t(r)][std::size_t(k)] = as_double(p[r * ld + k]);
  return m;
}

std::vector<double> flatten(const matrix& m) {
  std::vector<double> out;
  for (const auto& row : m) out.insert(out.end(), row.begin(), row.end());
  return out;
}

struct naive_result {
  std::vector<double> loss_rows, lse, entropy, target_logprob;
  std::vector<std::uint8_t> correct, kept;
  double loss_scalar = 0.0, weight_sum = 0.0;
  bool invalid = false;
  std::vector<double> de, dc, dbias, da, db;
};

template <class T>
naive_result naive(const problem<T>& p, const options& o, const std::vector<double>& grad) {
  const std::int64_t N = p.n, D = p.d, V = p.v, R = p.lora.rank;
  const std::size_t n = std::size_t(N), d = std::size_t(D), v = std::size_t(V), rk = std::size_t(R);
  const double s = p.lora.scale, T_ = o.temperature, cap = o.softcap, eps = o.label_smoothing, lambda = o.z_loss;

  const matrix E = read_matrix(p.e, N, D, p.lde ? p.lde : D);
  const matrix C = read_matrix(p.c, V, D, p.ldc ? p.ldc : D);
  matrix A, B;
  matrix W = C;  // effective classifier C + s B A, formed explicitly
  if (R > 0) {
    A = read_matrix(p.lora.a, R, D, p.lora.lda ? p.lora.lda : D);
    B = read_matrix(p.lora.b, V, R, p.lora.ldb ? p.lora.ldb : R);
    for (std::size_t c = 0; c < v; ++c)
      for (std::size_t k = 0; k < d; ++k) {
        double ba = 0.0;
        for (std::size_t r = 0; r < rk; ++r) ba += B[c][r] * A[r][k];
        W[c][k] += s * ba;
      }
  }
  std::vector<double> bias(v, 0.0), w(v, 1.0);
  if (p.bias)
    for (std::size_t c = 0; c < v; ++c) bias[c] = as_double(p.bias[c]);
  if (p.class_weights)
    for (std::size_t c = 0; c < v; ++c) w[c] = double(p.class_weights[c]);

  // Labels: the target each row is paired with, -1 when the row is ignored, V when it is invalid.
  std::vector<std::int64_t> label(n, -1);
  for (std::int64_t b = 0, S = o.shift > 0 ? p.seq_len : N; b < N / S; ++b)
    for (std::int64_t t = 0; t < S; ++t) {
      const std::int64_t row = b * S + t;
      if (t + o.shift >= S) continue;  // past the end of its sequence
      const std::int64_t src = b * S + t + o.shift;
      const std::int64_t y = p.targets_type == cce::target_type::int32
                                 ? std::int64_t(static_cast<const std::int32_t*>(p.targets)[src])
                                 : static_cast<const std::int64_t*>(p.targets)[src];
      if (y == o.ignore_index) continue;
      label[std::size_t(row)] = (y >= 0 && y < V) ? y : V;
    }

  // Logits, transformed logits and log-softmax, all materialised.
  matrix L(n, std::vector<double>(v)), Z = L, logp = L;
  naive_result out;
  out.lse.assign(n, 0.0);
  for (std::size_t i = 0; i < n; ++i) {
    for (std::size_t c = 0; c < v; ++c) {
      double dot = 0.0;
      for (std::size_t k = 0; k < d; ++k) dot += E[i][k] * W[c][k];
      L[i][c] = dot + bias[c];
      Z[i][c] = (cap > 0 ? cap * std::tanh(L[i][c] / cap) : L[i][c]) / T_;
    }
    const double m = *std::max_element(Z[i].begin(), Z[i].end());
    double sum = 0.0;
    for (std::size_t c = 0; c < v; ++c) sum += std::exp(Z[i][c] - m);
    for (std::size_t c = 0; c < v; ++c) logp[i][c] = Z[i][c] - m - std::log(sum);
    out.lse[i] = m + std::log(sum);
  }

  // Loss as torch writes it: (1 - eps) * nll + eps * smooth, smooth = -sum_v w_v log p_v / V.
  out.loss_rows.assign(n, 0.0);
  out.entropy.assign(n, 0.0);
  out.target_logprob.assign(n, 0.0);
  out.correct.assign(n, 0);
  out.kept.assign(n, 0);
  double total = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    if (label[i] < 0) continue;
    if (label[i] == V) {
      out.invalid = true;
      out.loss_rows[i] = nan_d;
      total += nan_d;
      continue;
    }
    const std::size_t y = std::size_t(label[i]);
    out.kept[i] = 1;
    double smooth = 0.0, entropy = 0.0;
    for (std::size_t c = 0; c < v; ++c) {
      smooth -= w[c] * logp[i][c];
      const double prob = std::exp(logp[i][c]);
      if (prob > 0) entropy -= prob * logp[i][c];
    }
    out.loss_rows[i] = -(1 - eps) * w[y] * logp[i][y] + eps * smooth / double(V) + lambda * out.lse[i] * out.lse[i];
    out.entropy[i] = entropy;
    out.target_logprob[i] = logp[i][y];
    out.correct[i] = std::size_t(std::max_element(Z[i].begin(), Z[i].end()) - Z[i].begin()) == y;
    out.weight_sum += w[y];
    total += out.loss_rows[i];
  }
  if (o.reduction == reduction::sum) out.loss_scalar = total;
  if (o.reduction == reduction::mean) out.loss_scalar = total / out.weight_sum;

  // Backward. Each row's loss is -sum_v q_v log p_v + lambda lse^2 with the target distribution
  // q_v = (1 - eps) w_y [v = y] + (eps / V) w_v, so dloss/dz_v = (sum_u q_u) p_v - q_v + 2 lambda lse p_v.
  matrix dL(n, std::vector<double>(v, 0.0));
  for (std::size_t i = 0; i < n; ++i) {
    if (!out.kept[i]) continue;
    const std::size_t y = std::size_t(label[i]);
    double g = grad[o.reduction == reduction::none ? i : 0];
    if (o.reduction == reduction::mean) g /= out.weight_sum;
    std::vector<double> q(v);
    double q_total = 0.0;
    for (std::size_t c = 0; c < v; ++c) {
      q[c] = (c == y ? (1 - eps) * w[y] : 0.0) + eps / double(V) * w[c];
      q_total += q[c];
    }
    for (std::size_t c = 0; c < v; ++c) {
      const double prob = std::exp(logp[i][c]);
      const double dz = g * (q_total * prob - q[c] + 2 * lambda * out.lse[i] * prob);
      const double dcap = cap > 0 ? 1.0 / (std::cosh(L[i][c] / cap) * std::cosh(L[i][c] / cap)) : 1.0;
      dL[i][c] = dz / T_ * dcap;
    }
  }
  matrix dW(v, std::vector<double>(d, 0.0)), dE(n, std::vector<double>(d, 0.0));
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t c = 0; c < v; ++c)
      for (std::size_t k = 0; k < d; ++k) {
        dW[c][k] += dL[i][c] * E[i][k];
        dE[i][k] += dL[i][c] * W[c][k];
      }
  out.de = flatten(dE);
  out.dc = flatten(dW);
  if (p.bias) {
    out.dbias.assign(v, 0.0);
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t c = 0; c < v; ++c) out.dbias[c] += dL[i][c];
  }
  if (R > 0) {
    matrix dA(rk, std::vector<double>(d, 0.0)), dB(v, std::vector<double>(rk, 0.0));
    for (std::size_t r = 0; r < rk; ++r)
      for (std::size_t c = 0; c < v; ++c)
        for (std::size_t k = 0; k < d; ++k) {
          dA[r][k] += s * B[c][r] * dW[c][k];
          dB[c][r] += s * dW[c][k] * A[r][k];
        }
    out.da = flatten(dA);
    out.db = flatten(dB);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Comparisons.

// Largest |got - want| relative to max(floor, largest |want|); NaN must sit at the same places. Infinity when the
// sizes or the NaN positions differ.
double max_rel_diff(const std::vector<double>& got, const std::vector<double>& want, double floor = 0.0) {
  if (got.size() != want.size()) return std::numeric_limits<double>::infinity();
  double diff = 0.0, scale = floor;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i]) || std::isnan(want[i])) {
      if (std::isnan(got[i]) != std::isnan(want[i])) return std::numeric_limits<double>::infinity();
      continue;
    }
    diff = std::max(diff, std::abs(got[i] - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  if (diff == 0.0) return 0.0;
  return scale > 0 ? diff / scale : std::numeric_limits<double>::infinity();
}

bool same_or_both_nan(double a, double b, double tol) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return std::abs(a - b) <= tol * std::max(1.0, std::abs(b));
}

constexpr double kTol = 1e-11;

// Every forward output and every gradient of the reference against the naive implementation.
template <class T>
void check_against_naive(const host_case<T>& h) {
  const case_config& cfg = h.cfg;
  INFO(cfg.describe());
  const problem<T> p = h.view();
  const std::vector<double> grad = make_grad(cfg);
  const naive_result want = naive(p, cfg.opts, grad);
  const reference_forward_result got = reference_forward(p, cfg.opts);
  const reference_gradients gg = reference_backward(p, cfg.opts, grad);

  CHECK(got.invalid_target == want.invalid);
  CHECK(same_or_both_nan(got.weight_sum, want.weight_sum, kTol));
  if (cfg.opts.reduction != reduction::none) CHECK(same_or_both_nan(got.loss_scalar, want.loss_scalar, kTol));
  CHECK(max_rel_diff(got.loss_rows, want.loss_rows, 1.0) <= kTol);
  CHECK(max_rel_diff(got.lse, want.lse, 1.0) <= kTol);
  CHECK(max_rel_diff(got.entropy, want.entropy, 1.0) <= kTol);
  CHECK(max_rel_diff(got.target_logprob, want.target_logprob, 1.0) <= kTol);
  CHECK(got.correct == want.correct);
  if (want.invalid) return;  // gradients of a NaN loss are not specified beyond "finite and no crash"
  const double floor = 1e-300;
  CHECK(max_rel_diff(gg.de, want.de, floor) <= kTol);
  CHECK(max_rel_diff(gg.dc, want.dc, floor) <= kTol);
  CHECK(max_rel_diff(gg.dbias, want.dbias, floor) <= kTol);
  CHECK(max_rel_diff(gg.da, want.da, floor) <= kTol);
  CHECK(max_rel_diff(gg.db, want.db, floor) <= kTol);
}

// Option combination `combo` (reduction = combo % 3, one flag per bit of combo / 3) on a random small shape.
case_config combination_case(int combo, bool all_features_shapes_tiny) {
  case_config cfg;
  cfg.seed = std::uint64_t(combo) * 2654435761u + 11;
  std::mt19937_64 rng(cfg.seed);
  auto pick = [&](std::int64_t lo, std::int64_t hi) {
    return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng);
  };
  const int bits = combo / 3;
  auto bit = [&](int i) { return ((bits >> i) & 1) != 0; };
  cfg.opts.reduction = combo % 3 == 0 ? reduction::none : combo % 3 == 1 ? reduction::sum : reduction::mean;
  cfg.opts.filter = cce::filter_mode::none;
  if (bit(0)) cfg.opts.softcap = pick(0, 1) ? 1.5f : 3.f;
  if (bit(1)) cfg.opts.temperature = pick(0, 1) ? 0.6f : 1.7f;
  if (bit(2)) cfg.opts.label_smoothing = pick(0, 1) ? 0.1f : 0.35f;
  if (bit(3)) cfg.opts.z_loss = pick(0, 1) ? 0.01f : 0.2f;
  cfg.weights = bit(4);
  cfg.bias = bit(5);
  if (all_features_shapes_tiny) {
    cfg.n = pick(1, 4);
    cfg.d = pick(1, 3);
    cfg.v = pick(1, 5);
  } else {
    cfg.n = pick(1, 9);
    cfg.d = pick(1, 7);
    cfg.v = pick(1, 11);
  }
  if (bit(6)) {
    cfg.rank = pick(1, 3);
    cfg.lora_scale = pick(0, 1) ? 0.5f : 2.f;
  }
  if (bit(7)) {
    cfg.seq_len = pick(1, 4);
    cfg.n = cfg.seq_len * pick(1, 3);
    cfg.opts.shift = pick(1, cfg.seq_len);  // shift == seq_len drops every row
  }
  cfg.int32_targets = bit(8);
  if (bit(9)) {
    cfg.ignore_fraction = 0.35;
    if (pick(0, 2) == 0) cfg.opts.ignore_index = pick(0, cfg.v - 1);  // an ignore_index inside [0, V)
  }
  cfg.e_pad = pick(0, 2);
  cfg.c_pad = pick(0, 2);
  cfg.a_pad = pick(0, 2);
  cfg.b_pad = pick(0, 2);
  cfg.spread = pick(0, 1) ? 1.f : 2.5f;
  return cfg;
}

constexpr int kFlagBits = 10;
constexpr int kCombinations = 3 << kFlagBits;

// ---------------------------------------------------------------------------------------------------------------
// Finite differences of the scalar objective (g * loss for mean and sum, sum_i g_i loss_i for none).

double objective(const dense_problem& x, const options& o, const std::vector<double>& g) {
  const reference_forward_result r = reference_forward(x, o);
  if (o.reduction != reduction::none) return g[0] * r.loss_scalar;
  double f = 0.0;
  for (std::size_t i = 0; i < r.loss_rows.size(); ++i) f += g[i] * r.loss_rows[i];
  return f;
}

struct fd_report {
  double worst = 0.0;     // largest |fd - analytic| / scale
  std::string where;      // which parameter
  std::size_t checked = 0;
};

// Central differences of every parameter of `field` against the analytic gradient, relative to `scale`.
void finite_difference(dense_problem& x, const options& o, const std::vector<double>& g,
                       std::vector<double> dense_problem::*field, const std::vector<double>& analytic,
                       const char* name, double scale, fd_report& rep) {
  std::vector<double>& values = x.*field;
  REQUIRE(values.size() == analytic.size());
  for (std::size_t k = 0; k < values.size(); ++k) {
    const double saved = values[k];
    const double h = 1e-6 * std::max(1.0, std::abs(saved));
    values[k] = saved + h;
    const double up = objective(x, o, g);
    values[k] = saved - h;
    const double down = objective(x, o, g);
    values[k] = saved;
    const double fd = (up - down) / (2 * h);
    const double err = std::abs(fd - analytic[k]) / scale;
    ++rep.checked;
    if (!(err <= rep.worst)) {  // also records a NaN
      rep.worst = std::isnan(err) ? std::numeric_limits<double>::infinity() : err;
      rep.where = std::string(name) + "[" + std::to_string(k) + "] fd=" + std::to_string(fd) +
                  " analytic=" + std::to_string(analytic[k]);
    }
  }
}

double max_abs(const std::vector<double>& v) {
  double m = 0.0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

bool all_zero(const std::vector<double>& v) {
  return std::all_of(v.begin(), v.end(), [](double x) { return x == 0.0; });
}

// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("reference matches a materialised implementation on every option combination", "[reference]") {
  // Each combination: a reduction and 10 on/off features (softcap, temperature, smoothing, z-loss, class weights,
  // bias, LoRA, shift, int32 targets, ignored rows) on a random small shape with random strides.
  for (int combo = 0; combo < kCombinations; ++combo) check_against_naive(make_case<float>(combination_case(combo, false)));
}

TEST_CASE("reference matches a materialised implementation on larger odd shapes in every input type",
          "[reference]") {
  std::mt19937_64 rng(2024);
  auto pick = [&](std::int64_t lo, std::int64_t hi) {
    return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng);
  };
  for (int t = 0; t < 60; ++t) {
    case_config cfg = combination_case(int(pick(0, kCombinations - 1)), false);
    cfg.seed = std::uint64_t(1000 + t);
    cfg.d = pick(1, 33);
    cfg.v = pick(1, 70);
    if (cfg.rank) cfg.rank = pick(1, 5);
    if (cfg.opts.ignore_index >= cfg.v) cfg.opts.ignore_index = -100;
    if (cfg.opts.shift) {
      cfg.seq_len = pick(2, 9);
      cfg.n = cfg.seq_len * pick(1, 5);
      cfg.opts.shift = pick(1, cfg.seq_len - 1);
    } else {
      cfg.n = pick(1, 45);
    }
    cfg.spread = 1.f / float(std::sqrt(double(cfg.d))) * (pick(0, 1) ? 2.f : 6.f);
    if (t % 3 == 0) check_against_naive(make_case<float>(cfg));
    if (t % 3 == 1) check_against_naive(make_case<__nv_bfloat16>(cfg));
    if (t % 3 == 2) check_against_naive(make_case<__half>(cfg));
  }
}

TEST_CASE("finite differences of the loss match every gradient on every option combination", "[reference]") {
  // Bias and LoRA are always on here, so all five gradients are checked in every combination.
  constexpr double kFdTol = 1e-6;
  double worst = 0.0;
  std::size_t checked = 0;
  for (int combo = 0; combo < kCombinations; ++combo) {
    case_config cfg = combination_case(combo, true);
    if (!cfg.bias || cfg.rank == 0) continue;  // those features are covered by the other half of the bits
    const host_case<float> h = make_case<float>(cfg);
    INFO(cfg.describe());
    const problem<float> p = h.view();
    dense_problem x = cce::host::to_dense(p, cfg.opts);
    const std::vector<double> g = make_grad(cfg);
    const reference_forward_result fw = reference_forward(x, cfg.opts);
    const reference_gradients an = reference_backward(x, cfg.opts, g);
    REQUIRE_FALSE(fw.invalid_target);
    if (cfg.opts.reduction == reduction::mean && fw.weight_sum == 0.0) {
      // Every row ignored: the mean is NaN and has no finite differences; the gradients are exactly zero.
      CHECK(std::isnan(fw.loss_scalar));
      CHECK((all_zero(an.de) && all_zero(an.dc) && all_zero(an.dbias) && all_zero(an.da) && all_zero(an.db)));
      continue;
    }
    const double scale = std::max({max_abs(an.de), max_abs(an.dc), max_abs(an.dbias), max_abs(an.da),
                                   max_abs(an.db), 1e-6});
    fd_report rep;
    finite_difference(x, cfg.opts, g, &dense_problem::e, an.de, "dE", scale, rep);
    finite_difference(x, cfg.opts, g, &dense_problem::c, an.dc, "dC", scale, rep);
    finite_difference(x, cfg.opts, g, &dense_problem::bias, an.dbias, "dBias", scale, rep);
    finite_difference(x, cfg.opts, g, &dense_problem::a, an.da, "dA", scale, rep);
    finite_difference(x, cfg.opts, g, &dense_problem::b, an.db, "dB", scale, rep);
    INFO(rep.where);
    CHECK(rep.worst <= kFdTol);
    worst = std::max(worst, rep.worst);
    checked += rep.checked;
  }
  INFO("finite differences: " << checked << " parameters, worst relative error " << worst);
  CHECK(checked > 10000);  // the loop really ran over the parameters
}

TEST_CASE("hand-computed values", "[reference]") {
  // One row, D = 1, V = 2: e = 1, c = (1, 0), target 0. z = (1, 0), lse = log(1 + e).
  const std::vector<float> e{1.f}, c{1.f, 0.f};
  const std::vector<std::int64_t> y{0};
  problem<float> p;
  p.n = 1;
  p.d = 1;
  p.v = 2;
  p.e = e.data();
  p.c = c.data();
  p.targets = y.data();
  options o;
  const double lse = std::log(1 + std::exp(1.0)), p0 = std::exp(1.0) / (1 + std::exp(1.0));

  SECTION("plain cross-entropy") {
    const auto r = reference_forward(p, o);
    CHECK(r.loss_scalar == Approx(0.31326168751822286).epsilon(1e-14));  // log(1 + 1/e)
    CHECK(r.lse[0] == Approx(lse).epsilon(1e-14));
    CHECK(r.entropy[0] == Approx(lse - p0).epsilon(1e-14));
    CHECK(r.target_logprob[0] == Approx(1 - lse).epsilon(1e-14));
    CHECK(r.correct[0] == 1);
    CHECK(r.weight_sum == 1.0);
    const auto g = reference_backward(p, o, {1.0});
    // dz = p - onehot = (p0 - 1, 1 - p0); dE = dz . c = p0 - 1; dC = dz^T e.
    CHECK(g.de[0] == Approx(p0 - 1).epsilon(1e-14));
    CHECK(g.dc[0] == Approx(p0 - 1).epsilon(1e-14));
    CHECK(g.dc[1] == Approx(1 - p0).epsilon(1e-14));
  }
  SECTION("smoothing, z-loss, temperature and softcap together") {
    o.label_smoothing = 0.5f;
    o.z_loss = 0.25f;
    o.temperature = 2.f;
    o.softcap = 4.f;
    const double z0 = 4 * std::tanh(0.25) / 2, l = std::log(std::exp(z0) + 1.0);
    // 0.5 (l - z0) + (0.5 / 2) ((l - z0) + (l - 0)) + 0.25 l^2
    const double want = 0.5 * (l - z0) + 0.25 * (2 * l - z0) + 0.25 * l * l;
    CHECK(reference_forward(p, o).loss_scalar == Approx(want).epsilon(1e-14));
  }
  SECTION("class weights: the mean divides by the target weights") {
    const std::vector<float> w{3.f, 0.5f};
    p.class_weights = w.data();
    const auto r = reference_forward(p, o);
    CHECK(r.loss_scalar == Approx(0.31326168751822286).epsilon(1e-14));  // 3 nll / 3
    CHECK(r.loss_rows[0] == Approx(3 * 0.31326168751822286).epsilon(1e-14));
    CHECK(r.weight_sum == 3.0);
    o.reduction = reduction::sum;
    CHECK(reference_forward(p, o).loss_scalar == Approx(3 * 0.31326168751822286).epsilon(1e-14));
  }
}

TEST_CASE("N = 1 and V = 1", "[reference]") {
  SECTION("a single class has loss lambda * z^2 and no cross-entropy gradient") {
    const std::vector<float> e{0.5f, -2.f}, c{1.5f, 0.25f};  // z = 0.75 - 0.5 = 0.25
    const std::vector<std::int64_t> y{0};
    problem<float> p;
    p.n = 1;
    p.d = 2;
    p.v = 1;
    p.e = e.data();
    p.c = c.data();
    p.targets = y.data();
    options o;
    o.label_smoothing = 0.2f;
    o.z_loss = 0.5f;
    const auto r = reference_forward(p, o);
    CHECK(r.lse[0] == Approx(0.25).epsilon(1e-15));
    CHECK(r.loss_scalar == Approx(0.5 * 0.0625).epsilon(1e-14));
    CHECK(std::abs(r.entropy[0]) < 1e-15);
    CHECK(r.target_logprob[0] == 0.0);
    CHECK(r.correct[0] == 1);
    // dz = 2 lambda lse p = 0.25; dE = dz c, dC = dz e.
    const auto g = reference_backward(p, o, {1.0});
    CHECK(g.de[0] == Approx(0.25 * 1.5).epsilon(1e-14));
    CHECK(g.de[1] == Approx(0.25 * 0.25).epsilon(1e-14));
    CHECK(g.dc[0] == Approx(0.25 * 0.5).epsilon(1e-14));
    CHECK(g.dc[1] == Approx(0.25 * -2.0).epsilon(1e-14));
  }
  SECTION("random single rows and single classes") {
    for (int t = 0; t < 40; ++t) {
      case_config cfg = combination_case(t * 77 % kCombinations, false);
      if (cfg.opts.shift) {
        cfg.opts.shift = 0;
        cfg.seq_len = 0;
      }
      cfg.seed = std::uint64_t(500 + t);
      if (t % 2) cfg.n = 1;
      else cfg.v = 1;
      if (cfg.opts.ignore_index >= cfg.v) cfg.opts.ignore_index = -100;
      check_against_naive(make_case<float>(cfg));
    }
  }
}

TEST_CASE("strided inputs: only the first D (or r) elements of each row are read", "[reference]") {
  for (int t = 0; t < 20; ++t) {
    case_config cfg = combination_case(t * 131 % kCombinations, false);
    cfg.rank = 2;
    cfg.bias = true;
    cfg.seed = std::uint64_t(900 + t);
    cfg.e_pad = cfg.c_pad = cfg.a_pad = cfg.b_pad = 0;
    const host_case<float> dense = make_case<float>(cfg);
    cfg.e_pad = 3;
    cfg.c_pad = 1;
    cfg.a_pad = 2;
    cfg.b_pad = 5;
    const host_case<float> strided = make_case<float>(cfg);  // same values, NaN in the padding
    INFO(cfg.describe());
    const options& o = cfg.opts;
    const std::vector<double> g = make_grad(cfg);
    const auto a = reference_forward(dense.view(), o), b = reference_forward(strided.view(), o);
    CHECK(max_rel_diff(b.loss_rows, a.loss_rows) == 0.0);
    CHECK(max_rel_diff(b.lse, a.lse) == 0.0);
    const auto ga = reference_backward(dense.view(), o, g), gb = reference_backward(strided.view(), o, g);
    CHECK(max_rel_diff(gb.de, ga.de) == 0.0);
    CHECK(max_rel_diff(gb.dc, ga.dc) == 0.0);
    CHECK(max_rel_diff(gb.da, ga.da) == 0.0);
    CHECK(max_rel_diff(gb.db, ga.db) == 0.0);
    for (double x : b.lse) CHECK(std::isfinite(x));
  }
}

TEST_CASE("int32 and int64 targets give the same results", "[reference]") {
  for (int t = 0; t < 20; ++t) {
    case_config cfg = combination_case(t * 97 % kCombinations, false);
    cfg.seed = std::uint64_t(1300 + t);
    cfg.ignore_fraction = 0.3;
    cfg.int32_targets = false;
    const host_case<float> h64 = make_case<float>(cfg);
    cfg.int32_targets = true;
    const host_case<float> h32 = make_case<float>(cfg);
    INFO(cfg.describe());
    const auto a = reference_forward(h64.view(), cfg.opts), b = reference_forward(h32.view(), cfg.opts);
    CHECK(max_rel_diff(b.loss_rows, a.loss_rows) == 0.0);
    CHECK(b.correct == a.correct);
    CHECK(b.weight_sum == a.weight_sum);
  }
}

TEST_CASE("shift k pairs row (b, t) with target (b, t + k) and drops the last k positions", "[reference]") {
  for (std::int64_t k = 1; k <= 3; ++k) {
    case_config cfg;
    cfg.n = 12;
    cfg.d = 5;
    cfg.v = 9;
    cfg.seq_len = 4;
    cfg.bias = true;
    cfg.weights = true;
    cfg.seed = std::uint64_t(77 + k);
    cfg.opts.reduction = reduction::none;
    cfg.opts.shift = k;
    const host_case<float> shifted = make_case<float>(cfg);
    // The same problem without shift, its targets moved by hand.
    host_case<float> moved = shifted;
    moved.cfg.opts.shift = 0;
    for (std::int64_t i = 0; i < cfg.n; ++i) {
      const std::int64_t t = i % cfg.seq_len;
      moved.set_target(i, t + k < cfg.seq_len ? shifted.t64[std::size_t(i + k)] : cfg.opts.ignore_index);
    }
    INFO("shift " << k);
    const auto a = reference_forward(shifted.view(), cfg.opts);
    const auto b = reference_forward(moved.view(), moved.cfg.opts);
    CHECK(max_rel_diff(a.loss_rows, b.loss_rows) == 0.0);
    CHECK(max_rel_diff(a.entropy, b.entropy) == 0.0);
    CHECK(max_rel_diff(a.target_logprob, b.target_logprob) == 0.0);
    CHECK(a.correct == b.correct);
    for (std::int64_t i = 0; i < cfg.n; ++i) {
      if (i % cfg.seq_len + k >= cfg.seq_len) {
        CHECK(a.loss_rows[std::size_t(i)] == 0.0);
      } else {
        CHECK(a.loss_rows[std::size_t(i)] > 0.0);
      }
    }
    const std::vector<double> g = make_grad(cfg);
    const auto ga = reference_backward(shifted.view(), cfg.opts, g);
    const auto gb = reference_backward(moved.view(), moved.cfg.opts, g);
    CHECK(max_rel_diff(ga.de, gb.de) == 0.0);
    CHECK(max_rel_diff(ga.dc, gb.dc) == 0.0);
  }
}

TEST_CASE("an invalid target sets the flag, makes its row's loss NaN and changes nothing else", "[reference]") {
  const std::int64_t bad_values[] = {9, 10, -1, -101, std::int64_t(1) << 40, std::numeric_limits<std::int32_t>::min()};
  for (const std::int64_t bad : bad_values) {
    for (int red = 0; red < 3; ++red) {
      case_config cfg;
      cfg.n = 6;
      cfg.d = 4;
      cfg.v = 9;
      cfg.rank = 2;
      cfg.bias = true;
      cfg.weights = true;
      cfg.int32_targets = bad > std::numeric_limits<std::int32_t>::max() ? false : (red == 1);
      cfg.seed = 4242;
      cfg.opts.label_smoothing = 0.1f;
      cfg.opts.reduction = reduction(red);
      host_case<float> h = make_case<float>(cfg);
      host_case<float> ignored = h;
      h.set_target(2, bad);
      ignored.set_target(2, cfg.opts.ignore_index);
      INFO("target " << bad << " " << cfg.describe());
      const auto r = reference_forward(h.view(), cfg.opts);
      const auto base = reference_forward(ignored.view(), cfg.opts);
      CHECK(r.invalid_target);
      CHECK_FALSE(base.invalid_target);
      CHECK(std::isnan(r.loss_rows[2]));
      if (cfg.opts.reduction != reduction::none) CHECK(std::isnan(r.loss_scalar));
      for (std::size_t i = 0; i < 6; ++i) {
        CHECK(std::isfinite(r.lse[i]));
        if (i == 2) continue;
        CHECK(r.loss_rows[i] == base.loss_rows[i]);
        CHECK(r.entropy[i] == base.entropy[i]);
      }
      CHECK(r.weight_sum == base.weight_sum);
      const std::vector<double> g = make_grad(cfg);
      const auto gr = reference_backward(h.view(), cfg.opts, g);
      const auto gbase = reference_backward(ignored.view(), cfg.opts, g);
      CHECK(max_rel_diff(gr.de, gbase.de) == 0.0);
      CHECK(max_rel_diff(gr.dc, gbase.dc) == 0.0);
      CHECK(max_rel_diff(gr.da, gbase.da) == 0.0);
      CHECK(max_rel_diff(gr.db, gbase.db) == 0.0);
      CHECK(max_rel_diff(gr.dbias, gbase.dbias) == 0.0);
      check_against_naive(h);
    }
  }
}

TEST_CASE("every row ignored: mean is NaN, sum is 0, gradients are 0, lse is still computed", "[reference]") {
  for (int combo = 0; combo < kCombinations; combo += 7) {
    case_config cfg = combination_case(combo, false);
    cfg.ignore_fraction = 1.0;
    if (cfg.opts.shift && combo % 2) {  // dropped by the shift instead of ignore_index
      cfg.ignore_fraction = 0.0;
      cfg.opts.shift = cfg.seq_len;
    }
    const host_case<float> h = make_case<float>(cfg);
    INFO(cfg.describe());
    const auto r = reference_forward(h.view(), cfg.opts);
    CHECK_FALSE(r.invalid_target);
    CHECK(r.weight_sum == 0.0);
    if (cfg.opts.reduction == reduction::mean) CHECK(std::isnan(r.loss_scalar));
    if (cfg.opts.reduction == reduction::sum) CHECK(r.loss_scalar == 0.0);
    for (std::size_t i = 0; i < std::size_t(cfg.n); ++i) {
      CHECK(r.loss_rows[i] == 0.0);
      CHECK(r.entropy[i] == 0.0);
      CHECK(r.target_logprob[i] == 0.0);
      CHECK(r.correct[i] == 0);
      CHECK(std::isfinite(r.lse[i]));
    }
    const auto g = reference_backward(h.view(), cfg.opts, make_grad(cfg));
    CHECK(g.de.size() == std::size_t(cfg.n * cfg.d));
    CHECK(g.dc.size() == std::size_t(cfg.v * cfg.d));
    CHECK((all_zero(g.de) && all_zero(g.dc) && all_zero(g.dbias) && all_zero(g.da) && all_zero(g.db)));
    check_against_naive(h);  // lse of every row against the naive one
  }
}

TEST_CASE("argmax ties: the first index wins", "[reference]") {
  // Classes 1 and 3 have identical rows, so their logits are equal and larger than the others.
  const std::vector<float> e{1.f, 2.f}, c{-1.f, 0.f, 1.f, 1.f, 0.f, -1.f, 1.f, 1.f, 0.5f, 0.5f};
  for (std::int64_t y = 0; y < 5; ++y) {
    const std::vector<std::int64_t> t{y};
    problem<float> p;
    p.n = 1;
    p.d = 2;
    p.v = 5;
    p.e = e.data();
    p.c = c.data();
    p.targets = t.data();
    const auto r = reference_forward(p, options{});
    CHECK(int(r.correct[0]) == int(y == 1));
  }
}

template <class T>
void check_rounded_inputs(const char* type_name) {
  INFO(type_name);
  case_config cfg;
  cfg.n = 7;
  cfg.d = 6;
  cfg.v = 11;
  cfg.rank = 3;
  cfg.e_pad = 2;
  cfg.b_pad = 1;
  cfg.bias = true;
  cfg.weights = true;
  cfg.seed = 31337;
  cfg.opts.softcap = 3.f;
  cfg.opts.label_smoothing = 0.1f;
  cfg.opts.reduction = reduction::sum;
  const host_case<float> exact = make_case<float>(cfg);
  // The same values stored in T, and once more in float after rounding through T.
  host_case<T> low;
  host_case<float> rounded = exact;
  low.cfg = cfg;
  low.t32 = exact.t32;
  low.t64 = exact.t64;
  low.weights = exact.weights;
  auto convert = [](const std::vector<float>& src, std::vector<T>& dst, std::vector<float>& back) {
    dst.resize(src.size());
    for (std::size_t k = 0; k < src.size(); ++k) {
      dst[k] = from_float<T>(src[k]);
      back[k] = float(as_double(dst[k]));
    }
  };
  convert(exact.e, low.e, rounded.e);
  convert(exact.c, low.c, rounded.c);
  convert(exact.bias, low.bias, rounded.bias);
  convert(exact.a, low.a, rounded.a);
  convert(exact.b, low.b, rounded.b);

  const dense_problem x = cce::host::to_dense(low.view(), cfg.opts);
  const dense_problem xe = cce::host::to_dense(exact.view(), cfg.opts);
  REQUIRE(x.e.size() == std::size_t(cfg.n * cfg.d));
  std::size_t changed = 0;
  for (std::int64_t i = 0; i < cfg.n; ++i)
    for (std::int64_t k = 0; k < cfg.d; ++k) {
      const std::size_t at = std::size_t(i * (cfg.d + cfg.e_pad) + k);
      CHECK(x.e[std::size_t(i * cfg.d + k)] == as_double(low.e[at]));
      changed += x.e[std::size_t(i * cfg.d + k)] != xe.e[std::size_t(i * cfg.d + k)];
    }
  CHECK(changed > 0);  // the rounding really happened
  for (std::int64_t v = 0; v < cfg.v; ++v)
    for (std::int64_t r = 0; r < cfg.rank; ++r)
      CHECK(x.b[std::size_t(v * cfg.rank + r)] == as_double(low.b[std::size_t(v * (cfg.rank + 1) + r)]));

  const auto got = reference_forward(low.view(), cfg.opts);
  const auto via_float = reference_forward(rounded.view(), cfg.opts);
  const auto unrounded = reference_forward(exact.view(), cfg.opts);
  CHECK(got.loss_scalar == via_float.loss_scalar);
  CHECK(max_rel_diff(got.lse, via_float.lse) == 0.0);
  CHECK(got.loss_scalar != unrounded.loss_scalar);
  const std::vector<double> g{0.75};
  const auto gg = reference_backward(low.view(), cfg.opts, g);
  const auto gf = reference_backward(rounded.view(), cfg.opts, g);
  CHECK(max_rel_diff(gg.de, gf.de) == 0.0);
  CHECK(max_rel_diff(gg.db, gf.db) == 0.0);
  check_against_naive(low);
}

TEST_CASE("bf16 and fp16 inputs are used exactly as rounded", "[reference]") {
  check_rounded_inputs<__nv_bfloat16>("bf16");
  check_rounded_inputs<__half>("fp16");
}

}  // namespace
