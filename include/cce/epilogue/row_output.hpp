// The finaliser's per-row step: from a row's merged statistics to its loss and optional outputs.
#pragma once

#include <cce/detail/targets.hpp>
#include <cce/epilogue/row_loss.hpp>
#include <cce/epilogue/row_partial.hpp>

namespace cce {

struct row_result {
  float lse = 0.f;
  float lse_others = 0.f;      // log-sum-exp of the classes other than a kept row's target
  float loss = 0.f;            // 0 for ignored rows, NaN for invalid targets
  float entropy = 0.f;
  float target_logprob = 0.f;
  bool correct = false;
  float weight = 0.f;          // w_y of a kept row: its share of the mean's normaliser
};

// log(exp(a) + exp(b)) and log(1 + exp(x)), without overflow.
CCE_HOST_DEVICE float log_add_exp(float a, float b) {
  const float m = detail::max_f(a, b);
  if (m == -detail::inf_f()) return m;
  return m + detail::log1p_f(detail::exp_f(detail::min_f(a, b) - m));
}
CCE_HOST_DEVICE float softplus(float x) {
  return x > 0.f ? x + detail::log1p_f(detail::exp_f(-x)) : detail::log1p_f(detail::exp_f(x));
}

// `p` holds the statistics of every class except a kept row's target (whose logit comes separately), so the
// cross-entropy nll = lse - z_y = softplus(lse_others - z_y) and p_y - 1 = -exp(lse_others - lse) keep full
// relative accuracy when the target dominates the row.
CCE_HOST_DEVICE row_result finalise_row(const row_partial& p, detail::row_label label, float target_logit,
                                        float target_weight, const loss_terms& terms) {
  row_result r;
  const float lse_others = p.softmax.lse();  // -inf when no other class exists (V = 1)
  r.lse_others = lse_others;
  if (label.kind != detail::row_label::kept) {
    r.lse = lse_others;  // nothing was set aside
    if (label.kind == detail::row_label::invalid) r.loss = detail::nan_f();
    return r;
  }
  r.lse = log_add_exp(target_logit, lse_others);
  const float nll = softplus(lse_others - target_logit);
  r.loss = terms.row_loss(r.lse, nll, target_weight, p.weighted_logit_sum);
  const float p_target = detail::exp_f(target_logit - r.lse);
  const float p_others = detail::exp_f(lse_others - r.lse);
  const float mean_others = p.softmax.sum_exp > 0.f ? p.softmax.mean_logit() : 0.f;
  // H = sum_v p_v (lse - z_v), split the same way: no cancellation between lse and the expected logit.
  r.entropy = p_target * nll + p_others * (r.lse - mean_others);
  r.target_logprob = -nll;
  r.correct = p.argmax_index == label.target;
  r.weight = target_weight;
  return r;
}

}  // namespace cce
