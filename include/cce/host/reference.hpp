// Exact CPU reference: every output of docs/api.md computed row by row in float64 from the problem's (rounded)
// inputs, with full logit rows materialised. It is the ground truth the tiled executor and the kernels are
// tested against, written for clarity first: each value is one plain sum in a fixed order (over k, v or i
// ascending). Rows (and, for dC, classes) are spread over the host's threads, a few rows at a time sharing each
// classifier row they read; no sum depends on the thread count. Pointers in the problem are host pointers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <thread>
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
  double loss_scalar = 0.0;       // mean or sum (unused for none)
  std::vector<double> loss_rows;  // per row: 0 ignored, NaN invalid
  std::vector<double> lse, entropy, target_logprob;
  std::vector<std::uint8_t> correct;
  bool invalid_target = false;
  double weight_sum = 0.0;  // sum of w_y over kept rows
};

struct reference_gradients {
  std::vector<double> de, dc, dbias, da, db;
  // The same sums over absolute values (sum |draw| |c| ...): how much rounding the logit gradient to a p-bit type
  // can move each element (u * scale), which tells a well-conditioned case from a cancelling one.
  std::vector<double> de_scale, dc_scale, dbias_scale, da_scale, db_scale;
};

namespace detail_reference {

// fn(begin, end) over [0, count) in contiguous chunks, one per thread of the host, each of at least a few million
// multiply-adds (`cost` per item): below that a thread costs more than it saves.
template <class F>
void parallel_for(std::int64_t count, std::int64_t cost, F fn) {
  const std::int64_t hw = std::max<std::int64_t>(1, std::int64_t(std::thread::hardware_concurrency()));
  const std::int64_t grain = std::max<std::int64_t>(1, (std::int64_t(1) << 22) / std::max<std::int64_t>(cost, 1));
  const std::int64_t workers = std::clamp<std::int64_t>(count / grain, 1, hw);
  if (workers == 1) {
    if (count > 0) fn(std::int64_t(0), count);
    return;
  }
  std::vector<std::thread> pool;
  for (std::int64_t w = 0; w < workers; ++w)
    pool.emplace_back([&, w] { fn(count * w / workers, count * (w + 1) / workers); });
  for (std::thread& t : pool) t.join();
}

// Rows read together: each classifier row is loaded once for them, and their sums run side by side.
inline constexpr std::int64_t row_group = 4;
inline std::int64_t groups_of(std::int64_t rows) { return (rows + row_group - 1) / row_group; }

// The logits of rows [i0, i0 + rows), rows <= row_group: raw (before softcap and temperature) and z, each rows x V.
inline void row_logits(const dense_problem& x, const options& o, std::int64_t i0, std::int64_t rows,
                       std::vector<double>& raw, std::vector<double>& z) {
  raw.assign(std::size_t(rows * x.v), 0.0);
  z.assign(std::size_t(rows * x.v), 0.0);
  std::vector<double> ea(std::size_t(rows * x.rank), 0.0);  // scale * e_i A^T
  for (std::int64_t j = 0; j < rows; ++j)
    for (std::int64_t r = 0; r < x.rank; ++r) {
      double s = 0.0;
      for (std::int64_t k = 0; k < x.d; ++k) s += x.e[std::size_t((i0 + j) * x.d + k)] * x.a[std::size_t(r * x.d + k)];
      ea[std::size_t(j * x.rank + r)] = x.scale * s;
    }
  std::vector<double> et(std::size_t(row_group * x.d), 0.0);  // the rows interleaved: et[k][j] = e[i0 + j][k]
  for (std::int64_t j = 0; j < rows; ++j)
    for (std::int64_t k = 0; k < x.d; ++k) et[std::size_t(k * row_group + j)] = x.e[std::size_t((i0 + j) * x.d + k)];
  for (std::int64_t v = 0; v < x.v; ++v) {
    const double* c = x.c.data() + v * x.d;
    double s[row_group] = {};
    for (std::int64_t k = 0; k < x.d; ++k)
      for (std::int64_t j = 0; j < row_group; ++j) s[j] += et[std::size_t(k * row_group + j)] * c[k];
    for (std::int64_t j = 0; j < rows; ++j) {
      double t = s[j];
      if (!x.bias.empty()) t += x.bias[std::size_t(v)];
      for (std::int64_t r = 0; r < x.rank; ++r) t += ea[std::size_t(j * x.rank + r)] * x.b[std::size_t(v * x.rank + r)];
      raw[std::size_t(j * x.v + v)] = t;
      const double capped = o.softcap > 0 ? double(o.softcap) * std::tanh(t / double(o.softcap)) : t;
      z[std::size_t(j * x.v + v)] = capped / double(o.temperature);
    }
  }
}

// log-sum-exp of z[0, count).
inline double log_sum_exp(const double* z, std::int64_t count) {
  double m = -std::numeric_limits<double>::infinity();
  for (std::int64_t v = 0; v < count; ++v) m = std::max(m, z[v]);
  if (std::isnan(m)) return m;
  double s = 0.0;
  for (std::int64_t v = 0; v < count; ++v) s += std::exp(z[v] - m);
  return m + std::log(s);
}

inline double weight(const dense_problem& x, std::int64_t v) {
  return x.weights.empty() ? 1.0 : x.weights[std::size_t(v)];
}

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
  const double eps = o.label_smoothing, lambda = o.z_loss;
  parallel_for(groups_of(x.n), row_group * x.v * x.d, [&](std::int64_t g0, std::int64_t g1) {
    std::vector<double> raw, z;
    for (std::int64_t i0 = g0 * row_group; i0 < std::min(x.n, g1 * row_group); i0 += row_group) {
      const std::int64_t rows = std::min(row_group, x.n - i0);
      row_logits(x, o, i0, rows, raw, z);
      for (std::int64_t j = 0; j < rows; ++j) {
        const std::int64_t i = i0 + j;
        const double* zi = z.data() + j * x.v;
        const double lse = log_sum_exp(zi, x.v);
        r.lse[std::size_t(i)] = lse;
        const auto kind = x.kind[std::size_t(i)];
        if (kind == dense_problem::row_kind::invalid)
          r.loss_rows[std::size_t(i)] = std::numeric_limits<double>::quiet_NaN();
        if (kind != dense_problem::row_kind::kept) continue;
        const std::int64_t y = x.target[std::size_t(i)];
        double smooth = 0.0, expected_z = 0.0;
        std::int64_t argmax = 0;
        for (std::int64_t v = 0; v < x.v; ++v) {
          smooth += weight(x, v) * (lse - zi[v]);
          expected_z += std::exp(zi[v] - lse) * zi[v];
          // As torch.argmax: NaN is the largest value, and the first index wins ties (strict comparison).
          const double zv = zi[v], za = zi[argmax];
          if ((std::isnan(zv) && !std::isnan(za)) || zv > za) argmax = v;
        }
        r.loss_rows[std::size_t(i)] =
            (1 - eps) * weight(x, y) * (lse - zi[y]) + eps / double(x.v) * smooth + lambda * lse * lse;
        r.entropy[std::size_t(i)] = lse - expected_z;
        r.target_logprob[std::size_t(i)] = zi[y] - lse;
        r.correct[std::size_t(i)] = argmax == y;
      }
    }
  });
  double loss_sum = 0.0;  // in row order
  for (std::int64_t i = 0; i < x.n; ++i) {
    const auto kind = x.kind[std::size_t(i)];
    if (kind == dense_problem::row_kind::ignored) continue;
    r.invalid_target = r.invalid_target || kind == dense_problem::row_kind::invalid;
    loss_sum += r.loss_rows[std::size_t(i)];
    if (kind == dense_problem::row_kind::kept) r.weight_sum += weight(x, x.target[std::size_t(i)]);
  }
  if (o.reduction == reduction::sum) r.loss_scalar = loss_sum;
  if (o.reduction == reduction::mean) r.loss_scalar = loss_sum / r.weight_sum;  // 0/0 = NaN with no kept row
  return r;
}

// grad_loss: 1 value (mean, sum) or N values (none): the upstream gradient of the loss.
// Rows go in blocks whose draws take a few tens of MB: each row's draw and dE row (in groups of rows), then each
// class's dC, dBias and dB over the block's rows, then the low-rank head's terms of dE and dA.
// `fw`: this problem's reference_forward.
inline reference_gradients reference_backward(const dense_problem& x, const options& o,
                                              const std::vector<double>& grad_loss,
                                              const reference_forward_result& fw) {
  using namespace detail_reference;
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
  const auto kept = [&](std::int64_t i) { return x.kind[std::size_t(i)] == dense_problem::row_kind::kept; };
  // Rows per block: their draws within 32 MiB.
  const std::int64_t block =
      row_group *
      std::min(std::max<std::int64_t>(1, (std::int64_t(1) << 22) / (row_group * std::max<std::int64_t>(x.v, 1))),
               std::max<std::int64_t>(1, groups_of(x.n)));
  std::vector<double> draw(std::size_t(block * x.v));
  std::vector<double> q(std::size_t(block * x.rank)), qa(q.size()), ea(q.size());  // draw B, |draw| |B|, scale e A^T
  for (std::int64_t b0 = 0; b0 < x.n; b0 += block) {
    const std::int64_t b1 = std::min(x.n, b0 + block);
    parallel_for(groups_of(b1 - b0), 2 * row_group * x.v * x.d, [&](std::int64_t g0, std::int64_t g1) {
      std::vector<double> raw, z;
      for (std::int64_t i0 = b0 + g0 * row_group; i0 < std::min(b1, b0 + g1 * row_group); i0 += row_group) {
        const std::int64_t rows = std::min(row_group, b1 - i0);
        row_logits(x, o, i0, rows, raw, z);
        for (std::int64_t j = 0; j < rows; ++j) {
          const std::int64_t i = i0 + j, at = i - b0;
          if (!kept(i)) continue;
          double gi = grad_loss[o.reduction == reduction::none ? std::size_t(i) : 0];
          if (o.reduction == reduction::mean) gi /= fw.weight_sum;
          const double lse = fw.lse[std::size_t(i)];
          const std::int64_t y = x.target[std::size_t(i)];
          const double wy = weight(x, y);
          double* d = draw.data() + at * x.v;
          for (std::int64_t v = 0; v < x.v; ++v) {
            const double p = std::exp(z[std::size_t(j * x.v + v)] - lse);
            const double dz = gi * ((1 - eps) * wy * (p - (v == y ? 1.0 : 0.0)) +
                                    eps / double(x.v) * (big_w * p - weight(x, v)) + 2 * lambda * lse * p);
            double slope = 1.0 / double(o.temperature);
            if (o.softcap > 0) {
              const double t = std::tanh(raw[std::size_t(j * x.v + v)] / double(o.softcap));
              slope *= 1 - t * t;
            }
            d[v] = dz * slope;
          }
          for (std::int64_t r = 0; r < x.rank; ++r) {
            double& qr = q[std::size_t(at * x.rank + r)];
            double& qar = qa[std::size_t(at * x.rank + r)];
            double& ear = ea[std::size_t(at * x.rank + r)];
            qr = qar = ear = 0.0;
            for (std::int64_t v = 0; v < x.v; ++v) {
              qr += d[v] * x.b[std::size_t(v * x.rank + r)];
              qar += std::abs(d[v] * x.b[std::size_t(v * x.rank + r)]);
            }
            for (std::int64_t k = 0; k < x.d; ++k) ear += x.e[std::size_t(i * x.d + k)] * x.a[std::size_t(r * x.d + k)];
            ear *= x.scale;
          }
        }
        // dE of the group's rows: the classes in order, each classifier row read once for the group.
        for (std::int64_t v = 0; v < x.v; ++v) {
          const double* c = x.c.data() + v * x.d;
          for (std::int64_t i = i0; i < i0 + rows; ++i) {
            if (!kept(i)) continue;
            const double dv = draw[std::size_t((i - b0) * x.v + v)];
            double* de = g.de.data() + i * x.d;
            double* de_scale = g.de_scale.data() + i * x.d;
            for (std::int64_t k = 0; k < x.d; ++k) {
              de[k] += dv * c[k];
              de_scale[k] += std::abs(dv * c[k]);
            }
          }
        }
      }
    });
    // dC, dBias and dB of each class over the block's rows, in row order, 64 rows of E at a time read by all the
    // thread's classes.
    parallel_for(x.v, (b1 - b0) * x.d, [&](std::int64_t v0, std::int64_t v1) {
      for (std::int64_t r0 = b0; r0 < b1; r0 += 64)
        for (std::int64_t v = v0; v < v1; ++v) {
          double* dc = g.dc.data() + v * x.d;
          double* dc_scale = g.dc_scale.data() + v * x.d;
          for (std::int64_t i = r0; i < std::min(b1, r0 + 64); ++i) {
            if (!kept(i)) continue;
            const double dv = draw[std::size_t((i - b0) * x.v + v)];
            const double* e = x.e.data() + i * x.d;
            for (std::int64_t k = 0; k < x.d; ++k) {
              dc[k] += dv * e[k];
              dc_scale[k] += std::abs(dv * e[k]);
            }
            if (!g.dbias.empty()) {
              g.dbias[std::size_t(v)] += dv;
              g.dbias_scale[std::size_t(v)] += std::abs(dv);
            }
            for (std::int64_t r = 0; r < x.rank; ++r) {
              const double er = ea[std::size_t((i - b0) * x.rank + r)];
              g.db[std::size_t(v * x.rank + r)] += dv * er;
              g.db_scale[std::size_t(v * x.rank + r)] += std::abs(dv * er);
            }
          }
        }
    });
    // The low-rank head's terms of dE (after its classes) and dA, in row order.
    for (std::int64_t i = b0; i < b1; ++i) {
      if (!kept(i)) continue;
      for (std::int64_t r = 0; r < x.rank; ++r)
        for (std::int64_t k = 0; k < x.d; ++k) {
          const double a = x.a[std::size_t(r * x.d + k)], e = x.e[std::size_t(i * x.d + k)];
          const double qr = q[std::size_t((i - b0) * x.rank + r)], qar = qa[std::size_t((i - b0) * x.rank + r)];
          g.de[std::size_t(i * x.d + k)] += x.scale * qr * a;
          g.da[std::size_t(r * x.d + k)] += x.scale * qr * e;
          g.de_scale[std::size_t(i * x.d + k)] += std::abs(x.scale * a) * qar;
          g.da_scale[std::size_t(r * x.d + k)] += std::abs(x.scale * e) * qar;
        }
    }
  }
  return g;
}

inline reference_gradients reference_backward(const dense_problem& x, const options& o,
                                              const std::vector<double>& grad_loss) {
  return reference_backward(x, o, grad_loss, reference_forward(x, o));
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
