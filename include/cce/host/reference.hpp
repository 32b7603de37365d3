// Exact CPU reference: every output of docs/api.md computed row by row in float64 from the problem's (rounded)
// inputs, with full logit rows materialised. It is the ground truth the tiled executor and the kernels are
// tested against, written for clarity rather than speed. Pointers in the problem are host pointers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <cce/detail/element_type.hpp>
#include <cce/options.hpp>
#include <cce/problem.hpp>

namespace cce::host {

// The problem in float64, dense (strides removed), with each row's target resolved.
struct dense_problem {
  std::int64_t n = 0, d = 0, v = 0, rank = 0;
  std::vector<double> e, c, bias, weights, a, b;  // bias, weights, a, b empty when absent
  double scale = 0.0;
  enum class row_kind { kept, ignored, invalid };
  std::vector<row_kind> kind;
  std::vector<std::int64_t> target;  // valid where kind == kept
};

template <class T>
dense_problem to_dense(const problem<T>& p, const options& o) {
  dense_problem x;
  x.n = p.n;
  x.d = p.d;
  x.v = p.v;
  x.rank = p.lora.rank;
  x.scale = p.lora.scale;
  auto f = [](T t) { return double(detail::to_float(t)); };
  x.e.reserve(std::size_t(p.n * p.d));
  x.c.reserve(std::size_t(p.v * p.d));
  for (std::int64_t i = 0; i < p.n; ++i)
    for (std::int64_t k = 0; k < p.d; ++k) x.e.push_back(f(p.e[i * p.e_stride() + k]));
  for (std::int64_t i = 0; i < p.v; ++i)
    for (std::int64_t k = 0; k < p.d; ++k) x.c.push_back(f(p.c[i * p.c_stride() + k]));
  if (p.bias)
    for (std::int64_t i = 0; i < p.v; ++i) x.bias.push_back(f(p.bias[i]));
  if (p.class_weights)
    for (std::int64_t i = 0; i < p.v; ++i) x.weights.push_back(double(p.class_weights[i]));
  if (p.has_lora()) {
    for (std::int64_t r = 0; r < p.lora.rank; ++r)
      for (std::int64_t k = 0; k < p.d; ++k) x.a.push_back(f(p.lora.a[r * p.a_stride() + k]));
    for (std::int64_t i = 0; i < p.v; ++i)
      for (std::int64_t r = 0; r < p.lora.rank; ++r) x.b.push_back(f(p.lora.b[i * p.b_stride() + r]));
  }
  for (std::int64_t i = 0; i < p.n; ++i) {
    // With shift k, position t of a sequence predicts the target stored at t + k; the last k positions have none.
    std::int64_t index = i;
    bool dropped = false;
    if (o.shift > 0) {
      dropped = (i % p.seq_len) + o.shift >= p.seq_len;
      index = i + o.shift;
    }
    std::int64_t y = -1;
    if (!dropped) {
      y = p.targets_type == target_type::int32 ? std::int64_t(static_cast<const std::int32_t*>(p.targets)[index])
                                               : static_cast<const std::int64_t*>(p.targets)[index];
    }
    if (dropped || y == o.ignore_index) {
      x.kind.push_back(dense_problem::row_kind::ignored);
    } else if (y < 0 || y >= p.v) {
      x.kind.push_back(dense_problem::row_kind::invalid);
    } else {
      x.kind.push_back(dense_problem::row_kind::kept);
    }
    x.target.push_back(y);
  }
  return x;
}

struct reference_forward_result {
  double loss_scalar = 0.0;            // mean or sum (unused for none)
  std::vector<double> loss_rows;       // per row: 0 ignored, NaN invalid
  std::vector<double> lse, entropy, target_logprob;
  std::vector<std::uint8_t> correct;
  bool invalid_target = false;
  double weight_sum = 0.0;             // sum of w_y over kept rows
};

struct reference_gradients {
  std::vector<double> de, dc, dbias, da, db;
  // The same sums over absolute values (sum |draw| |c| ...): how much rounding the logit gradient to a p-bit type
  // can move each element (u * scale), which tells a well-conditioned case from a cancelling one.
  std::vector<double> de_scale, dc_scale, dbias_scale, da_scale, db_scale;
};

namespace detail_reference {

// One row's logits: raw (before softcap and temperature) and z.
inline void row_logits(const dense_problem& x, const options& o, std::int64_t i, std::vector<double>& raw,
                       std::vector<double>& z) {
  raw.assign(std::size_t(x.v), 0.0);
  z.assign(std::size_t(x.v), 0.0);
  std::vector<double> ea(std::size_t(x.rank), 0.0);  // scale * e_i A^T
  for (std::int64_t r = 0; r < x.rank; ++r) {
    double s = 0.0;
    for (std::int64_t k = 0; k < x.d; ++k) s += x.e[std::size_t(i * x.d + k)] * x.a[std::size_t(r * x.d + k)];
    ea[std::size_t(r)] = x.scale * s;
  }
  for (std::int64_t v = 0; v < x.v; ++v) {
    double s = 0.0;
    for (std::int64_t k = 0; k < x.d; ++k) s += x.e[std::size_t(i * x.d + k)] * x.c[std::size_t(v * x.d + k)];
    if (!x.bias.empty()) s += x.bias[std::size_t(v)];
    for (std::int64_t r = 0; r < x.rank; ++r) s += ea[std::size_t(r)] * x.b[std::size_t(v * x.rank + r)];
    raw[std::size_t(v)] = s;
    const double capped = o.softcap > 0 ? double(o.softcap) * std::tanh(s / double(o.softcap)) : s;
    z[std::size_t(v)] = capped / double(o.temperature);
  }
}

inline double log_sum_exp(const std::vector<double>& z) {
  double m = -std::numeric_limits<double>::infinity();
  for (double t : z) m = std::max(m, t);
  if (std::isnan(m)) return m;
  double s = 0.0;
  for (double t : z) s += std::exp(t - m);
  return m + std::log(s);
}

inline double weight(const dense_problem& x, std::int64_t v) { return x.weights.empty() ? 1.0 : x.weights[std::size_t(v)]; }

inline double weight_total(const dense_problem& x) {
  double w = 0.0;
  for (std::int64_t v = 0; v < x.v; ++v) w += weight(x, v);
  return w;
}

}  // namespace detail_reference

inline reference_forward_result reference_forward(const dense_problem& x, const options& o) {
  using namespace detail_reference;
  reference_forward_result r;
  const std::size_t n = std::size_t(x.n);
  r.loss_rows.assign(n, 0.0);
  r.lse.assign(n, 0.0);
  r.entropy.assign(n, 0.0);
  r.target_logprob.assign(n, 0.0);
  r.correct.assign(n, 0);
  const double eps = o.label_smoothing, lambda = o.z_loss, big_w = weight_total(x);
  double loss_sum = 0.0;
  std::vector<double> raw, z;
  for (std::int64_t i = 0; i < x.n; ++i) {
    row_logits(x, o, i, raw, z);
    const double lse = log_sum_exp(z);
    r.lse[std::size_t(i)] = lse;
    const auto kind = x.kind[std::size_t(i)];
    if (kind == dense_problem::row_kind::invalid) {
      r.invalid_target = true;
      r.loss_rows[std::size_t(i)] = std::numeric_limits<double>::quiet_NaN();
      loss_sum += r.loss_rows[std::size_t(i)];
      continue;
    }
    if (kind == dense_problem::row_kind::ignored) continue;
    const std::int64_t y = x.target[std::size_t(i)];
    double smooth = 0.0, expected_z = 0.0;
    std::int64_t argmax = 0;
    for (std::int64_t v = 0; v < x.v; ++v) {
      smooth += weight(x, v) * (lse - z[std::size_t(v)]);
      expected_z += std::exp(z[std::size_t(v)] - lse) * z[std::size_t(v)];
      // As torch.argmax: NaN is the largest value, and the first index wins ties (strict comparison).
      const double zv = z[std::size_t(v)], za = z[std::size_t(argmax)];
      if ((std::isnan(zv) && !std::isnan(za)) || zv > za) argmax = v;
    }
    const double wy = weight(x, y);
    const double loss = (1 - eps) * wy * (lse - z[std::size_t(y)]) + eps / double(x.v) * smooth + lambda * lse * lse;
    r.loss_rows[std::size_t(i)] = loss;
    r.entropy[std::size_t(i)] = lse - expected_z;
    r.target_logprob[std::size_t(i)] = z[std::size_t(y)] - lse;
    r.correct[std::size_t(i)] = argmax == y;
    r.weight_sum += wy;
    loss_sum += loss;
    (void)big_w;
  }
  if (o.reduction == reduction::sum) r.loss_scalar = loss_sum;
  if (o.reduction == reduction::mean) r.loss_scalar = loss_sum / r.weight_sum;  // 0/0 = NaN with no kept row
  return r;
}

// grad_loss: 1 value (mean, sum) or N values (none): the upstream gradient of the loss.
inline reference_gradients reference_backward(const dense_problem& x, const options& o,
                                              const std::vector<double>& grad_loss) {
  using namespace detail_reference;
  const reference_forward_result fw = reference_forward(x, o);
  reference_gradients g;
  g.de.assign(std::size_t(x.n * x.d), 0.0);
  g.dc.assign(std::size_t(x.v * x.d), 0.0);
  if (!x.bias.empty()) g.dbias.assign(std::size_t(x.v), 0.0);
  if (x.rank > 0) {
    g.da.assign(std::size_t(x.rank * x.d), 0.0);
    g.db.assign(std::size_t(x.v * x.rank), 0.0);
  }
  g.de_scale.assign(g.de.size(), 0.0);
  g.dc_scale.assign(g.dc.size(), 0.0);
  g.dbias_scale.assign(g.dbias.size(), 0.0);
  g.da_scale.assign(g.da.size(), 0.0);
  g.db_scale.assign(g.db.size(), 0.0);
  const double eps = o.label_smoothing, lambda = o.z_loss, big_w = weight_total(x);
  std::vector<double> raw, z, draw(std::size_t(x.v));
  for (std::int64_t i = 0; i < x.n; ++i) {
    if (x.kind[std::size_t(i)] != dense_problem::row_kind::kept) continue;
    double gi = grad_loss[o.reduction == reduction::none ? std::size_t(i) : 0];
    if (o.reduction == reduction::mean) gi /= fw.weight_sum;
    row_logits(x, o, i, raw, z);
    const double lse = fw.lse[std::size_t(i)];
    const std::int64_t y = x.target[std::size_t(i)];
    const double wy = weight(x, y);
    for (std::int64_t v = 0; v < x.v; ++v) {
      const double p = std::exp(z[std::size_t(v)] - lse);
      const double dz = gi * ((1 - eps) * wy * (p - (v == y ? 1.0 : 0.0)) +
                              eps / double(x.v) * (big_w * p - weight(x, v)) + 2 * lambda * lse * p);
      double slope = 1.0 / double(o.temperature);
      if (o.softcap > 0) {
        const double t = std::tanh(raw[std::size_t(v)] / double(o.softcap));
        slope *= 1 - t * t;
      }
      draw[std::size_t(v)] = dz * slope;
    }
    std::vector<double> q(std::size_t(x.rank), 0.0), qa(std::size_t(x.rank), 0.0);  // draw B, |draw| |B|
    std::vector<double> ea(std::size_t(x.rank), 0.0);                                 // scale e A^T
    for (std::int64_t r = 0; r < x.rank; ++r) {
      for (std::int64_t v = 0; v < x.v; ++v) {
        q[std::size_t(r)] += draw[std::size_t(v)] * x.b[std::size_t(v * x.rank + r)];
        qa[std::size_t(r)] += std::abs(draw[std::size_t(v)] * x.b[std::size_t(v * x.rank + r)]);
      }
      for (std::int64_t k = 0; k < x.d; ++k) ea[std::size_t(r)] += x.e[std::size_t(i * x.d + k)] * x.a[std::size_t(r * x.d + k)];
      ea[std::size_t(r)] *= x.scale;
    }
    for (std::int64_t v = 0; v < x.v; ++v) {
      const double dv = draw[std::size_t(v)];
      for (std::int64_t k = 0; k < x.d; ++k) {
        g.de[std::size_t(i * x.d + k)] += dv * x.c[std::size_t(v * x.d + k)];
        g.dc[std::size_t(v * x.d + k)] += dv * x.e[std::size_t(i * x.d + k)];
        g.de_scale[std::size_t(i * x.d + k)] += std::abs(dv * x.c[std::size_t(v * x.d + k)]);
        g.dc_scale[std::size_t(v * x.d + k)] += std::abs(dv * x.e[std::size_t(i * x.d + k)]);
      }
      if (!g.dbias.empty()) {
        g.dbias[std::size_t(v)] += dv;
        g.dbias_scale[std::size_t(v)] += std::abs(dv);
      }
      for (std::int64_t r = 0; r < x.rank; ++r) {
        g.db[std::size_t(v * x.rank + r)] += dv * ea[std::size_t(r)];
        g.db_scale[std::size_t(v * x.rank + r)] += std::abs(dv * ea[std::size_t(r)]);
      }
    }
    for (std::int64_t r = 0; r < x.rank; ++r)
      for (std::int64_t k = 0; k < x.d; ++k) {
        const double a = x.a[std::size_t(r * x.d + k)], e = x.e[std::size_t(i * x.d + k)];
        g.de[std::size_t(i * x.d + k)] += x.scale * q[std::size_t(r)] * a;
        g.da[std::size_t(r * x.d + k)] += x.scale * q[std::size_t(r)] * e;
        g.de_scale[std::size_t(i * x.d + k)] += std::abs(x.scale * a) * qa[std::size_t(r)];
        g.da_scale[std::size_t(r * x.d + k)] += std::abs(x.scale * e) * qa[std::size_t(r)];
      }
  }
  return g;
}

template <class T>
reference_forward_result reference_forward(const problem<T>& p, const options& o) {
  return reference_forward(to_dense(p, o), o);
}

template <class T>
reference_gradients reference_backward(const problem<T>& p, const options& o, const std::vector<double>& grad_loss) {
  return reference_backward(to_dense(p, o), o, grad_loss);
}

}  // namespace cce::host
