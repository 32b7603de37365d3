// Random problems for the tests: shapes, options and data regimes (docs/testing.md), held in host vectors, with
// a one-line description that reproduces a case.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <cce/detail/element_type.hpp>
#include <cce/options.hpp>
#include <cce/problem.hpp>

namespace cce::test {

// near_flat: logits within about a tenth of flat along one direction every class shares (C = g w + noise, E along
// w): the softmax's first-order deviation from flat is about a tenth of the gradient (not a random regime).
enum class regime { lm_like, uniform, peaked, near_flat };

inline const char* to_string(regime r) {
  switch (r) {
    case regime::lm_like: return "lm-like";
    case regime::uniform: return "uniform";
    case regime::peaked: return "peaked";
    case regime::near_flat:
      return "near-flat";
  }
  return "?";
}

struct case_config {
  std::int64_t n = 8, d = 16, v = 32;
  std::int64_t rank = 0;
  std::int64_t e_pad = 0, c_pad = 0;  // extra leading-dimension elements
  bool bias = false;
  bool class_weights = false;
  bool int32_targets = false;
  double ignore_fraction = 0.0;
  std::int64_t seq_len = 0;  // with options.shift
  regime data = regime::lm_like;
  std::uint64_t seed = 1;
  bool accuracy = true;  // ask for the `correct` output (the forward then tracks each row's argmax)
  bool unit_grad = false;  // the upstream gradient is 1 (loss_and_grad's)
  // Times the schedule adds to dC and dBias in T beyond the output's own rounding (loss_and_grad's row blocks
  // after the first): each rounds within u of a partial sum, itself within the gradient's scale.
  std::int64_t extra_class_roundings = 0;
  // The same for dE (the first-order baseline's share and the one-hot terms, each added after the walk, round dE and
  // dC once more each).
  std::int64_t extra_row_roundings = 0;
  // Every third row of E below this many scaled by 20: rows far from flat beside near-flat ones in the same tiles.
  std::int64_t sharp_rows = 0;
  // No row's target is the class its row dominates on peaked data (row i's target moves from class i to i + 1):
  // every target then lies where the softmax is negligible.
  bool targets_off_peak = false;
  options opts{};
  int index = -1;  // position in a randomized loop: CCE_CASE=<index> reruns that case alone

  std::string describe() const {
    std::ostringstream s;
    if (index >= 0) s << "CCE_CASE=" << index << " ";
    s << "n=" << n << " d=" << d << " v=" << v << " rank=" << rank << " e_pad=" << e_pad << " c_pad=" << c_pad
      << " bias=" << bias << " weights=" << class_weights << " int32=" << int32_targets << " ignore=" << ignore_fraction
      << " seq_len=" << seq_len << " data=" << to_string(data) << " sharp_rows=" << sharp_rows
      << " off_peak=" << targets_off_peak << " seed=" << seed << " | reduction=" << int(opts.reduction)
      << " softcap=" << opts.softcap << " T=" << opts.temperature << " smoothing=" << opts.label_smoothing
      << " z_loss=" << opts.z_loss << " filter=" << int(opts.filter) << " filter_de=" << opts.filter_de
      << " filter_dc=" << opts.filter_dc << " kahan=" << (opts.accum == accumulation::kahan) << " shift=" << opts.shift
      << " ignore_index=" << opts.ignore_index << " accumulate=" << opts.accumulate
      << " hopper_kernels=" << opts.hopper_kernels << " vocab_sort=" << opts.vocab_sort << " accuracy=" << accuracy;
    return s.str();
  }
};

// The problem's inputs in host memory, stored in T exactly as the device sees them.
template <class T>
struct host_problem {
  case_config cfg;
  std::vector<T> e, c, bias, a, b;
  std::vector<float> weights;
  std::vector<std::int64_t> t64;
  std::vector<std::int32_t> t32;

  problem<T> view() const {
    problem<T> p;
    p.n = cfg.n;
    p.d = cfg.d;
    p.v = cfg.v;
    p.e = e.data();
    p.lde = cfg.d + cfg.e_pad;
    p.c = c.data();
    p.ldc = cfg.d + cfg.c_pad;
    p.targets = cfg.int32_targets ? static_cast<const void*>(t32.data()) : static_cast<const void*>(t64.data());
    p.targets_type = cfg.int32_targets ? target_type::int32 : target_type::int64;
    p.bias = cfg.bias ? bias.data() : nullptr;
    p.class_weights = cfg.class_weights ? weights.data() : nullptr;
    if (cfg.rank > 0) {
      p.lora.a = a.data();
      p.lora.b = b.data();
      p.lora.rank = cfg.rank;
      p.lora.scale = 0.5f;
    }
    p.seq_len = cfg.seq_len;
    return p;
  }
};

// Inputs for a configuration, following the data regimes of the benchmark specification (scaled to D).
template <class T>
host_problem<T> make_problem(const case_config& cfg) {
  host_problem<T> h;
  h.cfg = cfg;
  std::mt19937_64 rng(cfg.seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_int_distribution<std::int64_t> cls(0, cfg.v - 1);
  const std::int64_t lde = cfg.d + cfg.e_pad, ldc = cfg.d + cfg.c_pad;
  std::vector<std::int64_t> target(std::size_t(std::max<std::int64_t>(cfg.n, 0)));
  for (auto& t : target) t = cls(rng);
  for (std::int64_t i = 0; cfg.targets_off_peak && i < cfg.n; ++i)
    if (target[std::size_t(i)] == i) target[std::size_t(i)] = (i + 1) % cfg.v;

  std::vector<float> cf(std::size_t(cfg.v * ldc), 0.f), ef(std::size_t(cfg.n * lde), 0.f);
  const float sd = float(std::sqrt(double(cfg.d)));
  for (std::int64_t i = 0; i < cfg.v; ++i)
    for (std::int64_t k = 0; k < cfg.d; ++k) {
      const float x = normal(rng);
      cf[std::size_t(i * ldc + k)] = cfg.data == regime::lm_like   ? 2.f * x / sd
                                     : cfg.data == regime::uniform ? 0.01f * x
                                                                   : x / std::sqrt(sd);
    }
  for (std::int64_t i = 0; i < cfg.n; ++i)
    for (std::int64_t k = 0; k < cfg.d; ++k) {
      const float x = normal(rng);
      float val = cfg.data == regime::lm_like   ? x + 1.5f * cf[std::size_t(target[std::size_t(i)] * ldc + k)]
                  : cfg.data == regime::uniform ? 0.01f * x
                                                : x / std::sqrt(sd);
      ef[std::size_t(i * lde + k)] = val;
    }
  if (cfg.data == regime::near_flat) {  // z_nv = 0.1 (1 + 0.3 h_n) g_v + noise: sd(z) about 0.1 per row
    std::vector<float> w(std::size_t(cfg.d));
    for (float& x : w) x = normal(rng) / sd;
    for (std::int64_t i = 0; i < cfg.v; ++i) {
      const float g = normal(rng);
      for (std::int64_t k = 0; k < cfg.d; ++k)
        cf[std::size_t(i * ldc + k)] = g * w[std::size_t(k)] + 0.05f * normal(rng) / sd;
    }
    for (std::int64_t i = 0; i < cfg.n; ++i) {
      const float h = 0.1f * (1.f + 0.3f * normal(rng));
      for (std::int64_t k = 0; k < cfg.d; ++k)
        ef[std::size_t(i * lde + k)] = h * w[std::size_t(k)] + 0.01f * normal(rng) / sd;
    }
  }
  if (cfg.data == regime::peaked) {  // classifier row i equals embedding i: one dominant logit per row
    for (std::int64_t i = 0; i < std::min(cfg.n, cfg.v); ++i)
      for (std::int64_t k = 0; k < cfg.d; ++k) cf[std::size_t(i * ldc + k)] = ef[std::size_t(i * lde + k)];
  }
  for (std::int64_t i = 0; i < std::min(cfg.sharp_rows, cfg.n); i += 3)
    for (std::int64_t k = 0; k < cfg.d; ++k) ef[std::size_t(i * lde + k)] *= 20.f;
  // Padding elements hold loud values: a kernel that reads them corrupts the result.
  for (std::int64_t i = 0; i < cfg.v; ++i)
    for (std::int64_t k = cfg.d; k < ldc; ++k) cf[std::size_t(i * ldc + k)] = 1e4f;
  for (std::int64_t i = 0; i < cfg.n; ++i)
    for (std::int64_t k = cfg.d; k < lde; ++k) ef[std::size_t(i * lde + k)] = 1e4f;
  h.c.reserve(cf.size());
  h.e.reserve(ef.size());
  for (float x : cf) h.c.push_back(detail::from_float<T>(x));
  for (float x : ef) h.e.push_back(detail::from_float<T>(x));

  if (cfg.bias) {  // on uniform data as small as the logits, so that the softmax stays near-uniform
    const float scale = cfg.data == regime::uniform ? 0.01f : 0.5f;
    for (std::int64_t i = 0; i < cfg.v; ++i) h.bias.push_back(detail::from_float<T>(scale * normal(rng)));
  }
  if (cfg.class_weights) {
    std::uniform_real_distribution<float> w(0.25f, 2.f);
    for (std::int64_t i = 0; i < cfg.v; ++i) h.weights.push_back(w(rng));
  }
  if (cfg.rank > 0) {
    for (std::int64_t i = 0; i < cfg.rank * cfg.d; ++i) h.a.push_back(detail::from_float<T>(normal(rng) / sd));
    for (std::int64_t i = 0; i < cfg.v * cfg.rank; ++i) h.b.push_back(detail::from_float<T>(0.5f * normal(rng)));
  }
  std::bernoulli_distribution ignored(cfg.ignore_fraction);
  for (auto t : target) {
    const std::int64_t y = ignored(rng) ? cfg.opts.ignore_index : t;
    h.t64.push_back(y);
    h.t32.push_back(std::int32_t(y));
  }
  return h;
}

// Whether a randomized loop runs case `index`: all of them, or only the one named by the environment variable
// CCE_CASE. Loops draw every configuration either way, so case k is the same case alone or in the full run.
inline bool case_selected(int index) {
  const char* only = std::getenv("CCE_CASE");
  return only == nullptr || *only == '\0' || std::atoi(only) == index;
}

// A random configuration: odd sizes, tiny vocabularies, single rows and every option, drawn from `rng`.
inline case_config random_config(std::mt19937_64& rng, std::int64_t max_n, std::int64_t max_d, std::int64_t max_v) {
  auto pick = [&](std::int64_t lo, std::int64_t hi) { return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng); };
  auto coin = [&](double p) { return std::bernoulli_distribution(p)(rng); };
  case_config c;
  c.seed = rng();
  c.n = coin(0.1) ? 1 : pick(1, max_n);
  c.d = coin(0.3) ? pick(1, 24) : pick(1, max_d);
  c.v = coin(0.2) ? pick(1, 20) : pick(1, max_v);
  c.rank = coin(0.2) ? (coin(0.5) ? 1 : pick(2, 16)) : 0;
  c.e_pad = coin(0.2) ? pick(1, 9) : 0;
  c.c_pad = coin(0.2) ? pick(1, 9) : 0;
  c.bias = coin(0.3);
  c.class_weights = coin(0.2);
  c.int32_targets = coin(0.3);
  c.ignore_fraction = coin(0.3) ? (coin(0.1) ? 1.0 : 0.25) : 0.0;
  c.data = regime(pick(0, 2));
  options& o = c.opts;
  o.reduction = reduction(pick(0, 2));
  if (coin(0.25)) o.softcap = float(pick(5, 40));
  if (coin(0.2)) o.temperature = coin(0.5) ? 0.7f : 1.6f;
  if (coin(0.2)) o.label_smoothing = 0.1f;
  if (coin(0.2)) o.z_loss = 1e-3f;
  o.filter = coin(0.5) ? filter_mode::automatic : filter_mode::none;
  if (coin(0.2)) (coin(0.5) ? o.filter_de : o.filter_dc) = false;  // one gradient filtered (or none)
  if (coin(0.2)) o.accum = accumulation::kahan;
  if (coin(0.1)) o.ignore_index = -1;
  if (coin(0.2)) {
    o.shift = pick(1, 2);
    std::int64_t seq = pick(2, 8);
    c.n = std::max<std::int64_t>(1, c.n / seq) * seq;
    c.seq_len = seq;
  }
  o.accumulate = coin(0.15);
  c.accuracy = coin(0.7);
  // Where rows may leave a first-order share and their target's term to the updates after the walk (both gradients
  // filtered, no bias, smoothing or low-rank head: plan::linear_rows), dE and dC may be rounded twice more.
  if (o.filter != filter_mode::none && o.filter_de && o.filter_dc && !c.bias && o.label_smoothing == 0.f && c.rank == 0)
    c.extra_row_roundings = c.extra_class_roundings = 2;
  return c;
}

// ||x - ref|| / ||ref|| (ref = 0 gives the absolute norm); any NaN in x that is not in ref gives infinity.
template <class X, class R>
double relative_l2(const X& x, const R& ref) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double a = double(x[i]), b = double(ref[i]);
    if (std::isnan(a) != std::isnan(b)) return INFINITY;
    if (std::isnan(b)) continue;
    num += (a - b) * (a - b);
    den += b * b;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

}  // namespace cce::test
