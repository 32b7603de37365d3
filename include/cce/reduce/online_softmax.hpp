// Online softmax statistics of a row: running max m, s = sum exp(z - m) and t = sum exp(z - m) * z.
// Merging is associative and commutative (up to rounding), so vocab tiles and split-V partials combine in any
// order. lse = m + log s and sum_v p_v z_v = t / s; rows with no finite logit keep m = -inf, s = 0.
#pragma once

#include <cce/detail/math.hpp>

namespace cce {

struct softmax_stats {
  float max = -detail::inf_f();
  float sum_exp = 0.f;
  float sum_exp_z = 0.f;

  CCE_HOST_DEVICE float lse() const { return max + detail::log_f(sum_exp); }
  // Expected logit under the softmax: sum_v p_v z_v.
  CCE_HOST_DEVICE float mean_logit() const { return sum_exp_z / sum_exp; }
};

// Adds one logit. Written so that z = -inf contributes nothing and z = +inf or NaN propagates.
CCE_HOST_DEVICE softmax_stats softmax_push(softmax_stats s, float z) {
  if (z == -detail::inf_f()) return s;
  const float m = detail::max_f(s.max, z);
  const float scale = (s.max == -detail::inf_f()) ? 0.f : detail::exp_f(s.max - m);
  const float w = detail::exp_f(z - m);
  return {m, s.sum_exp * scale + w, s.sum_exp_z * scale + w * z};
}

CCE_HOST_DEVICE softmax_stats softmax_merge(softmax_stats a, softmax_stats b) {
  if (a.max == -detail::inf_f()) return b;
  if (b.max == -detail::inf_f()) return a;
  const float m = detail::max_f(a.max, b.max);
  const float sa = detail::exp_f(a.max - m);
  const float sb = detail::exp_f(b.max - m);
  return {m, a.sum_exp * sa + b.sum_exp * sb, a.sum_exp_z * sa + b.sum_exp_z * sb};
}

}  // namespace cce
