// Per-row terms shared by every executor (CPU tiled, GPU kernels): the loss of one row from its statistics, and
// the coefficients of its logit gradient. With W = sum_v w_v (V without weights), eps = label smoothing and
// lambda = z-loss coefficient:
//   loss = (1-eps) w_y (lse - z_y) + (eps/V) sum_v w_v (lse - z_v) + lambda lse^2
//        = (1-eps) w_y nll + (eps/V) (W lse - sum_v w_v z_v) + lambda lse^2,     nll = lse - z_y
//   dz_v = g [ (1-eps) w_y (p_v - [v=y]) + (eps/V)(W p_v - w_v) + 2 lambda lse p_v ]
//        = ce (p_v - [v=y]) + extra p_v - gamma w_v
// The cross-entropy term keeps its own factor, and the target's p_y - 1 comes in precomputed from the non-target
// mass (-exp(lse_others - lse)): when p_y is near 1 both nll and p_y - 1 are tiny, and forming them by subtracting
// rounded lse and z_y would leave only rounding error.
// A near-uniform row (filter/predicates.hpp) draws dz_v f_v - baseline, baseline = (ce + extra) / V, f_v the
// softcap's factor of dz/draw (1 without softcap): the tiles without its target then hold only the softmax's
// deviation from 1/V, which the filter may skip, and the products add the baseline's share back for every class
// (baseline times the column sums of C into dE, the rows' baselines times E into every class of dC).
// A row near enough to flat takes the baseline to first order instead (no bias): with zbar the row's mean logit and
// kappa = exp(zbar - lse) V, p_v = (kappa / V) e^(z_v - zbar) >= (kappa / V)(1 + z_v - zbar), so a draw less the
// baseline (ce + extra) kappa / V and less slope (z_v - zbar), slope = baseline / T, leaves a deviation that is
// nowhere negative and adds up to 1 - kappa exactly; the products add the linear share through C^T C (dE) and E^T E
// (dC) after the walk (dispatch/portable.cuh, after_walk_products), then the row's one-hot term. The share is
// linear in raw / T; with a softcap the walk's draws take the logit z they have, and filter::near_uniform_linear
// bounds what that and the softcap's curvature add.
#pragma once

#include <cce/detail/math.hpp>

namespace cce {

// Row-independent constants of the loss.
struct loss_terms {
  float smoothing = 0.f;      // eps
  float z_loss = 0.f;         // lambda
  float inv_classes = 0.f;    // 1 / V
  float weight_total = 0.f;   // W

  CCE_HOST_DEVICE float row_loss(float lse, float nll, float target_weight, float weighted_logit_sum) const {
    float loss = (1.f - smoothing) * target_weight * nll;
    if (smoothing != 0.f) loss += smoothing * inv_classes * (weight_total * lse - weighted_logit_sum);
    if (z_loss != 0.f) loss += z_loss * lse * lse;
    return loss;
  }
};

// dz_v = ce (p_v - [v = y]) + extra p_v - gamma w_v for one row with upstream gradient g.
struct dlogit_coefficients {
  float ce = 0.f;               // g (1 - eps) w_y
  float extra = 0.f;            // g (eps W / V + 2 lambda lse)
  float gamma = 0.f;            // g eps / V
  float target_residual = 0.f;  // p_y - 1
  float baseline = 0.f;         // (ce + extra) / V for a near-uniform row, times kappa to first order, else 0
  float slope = 0.f;            // baseline / T for a row near-uniform to first order, else 0
  float mean_logit = 0.f;       // zbar of such a row

  // dz_v without the baseline.
  CCE_HOST_DEVICE float operator()(float p, bool is_target, float class_weight) const {
    return ce * (is_target ? target_residual : p) + extra * p - gamma * class_weight;
  }
  // What the products take for class v of logit z: dz_v times the logit's derivative dz/draw = f_v / T, less the
  // baseline's share baseline / T + slope (z - zbar).
  CCE_HOST_DEVICE float draw(float p, bool is_target, float class_weight, float derivative, float inv_temperature,
                             float z) const {
    return (*this)(p, is_target, class_weight) * derivative - baseline * inv_temperature - slope * (z - mean_logit);
  }

  // The common case in four coefficients: at a class that is not the target, of weight 1, with the derivative's
  // constant factor s = 1/T, the draw is (a p + b) f + c + l z, f the softcap's factor when `capped` (without
  // softcap c joins b and is 0); l = -slope is 0 unless the row is near-uniform to first order.
  struct affine {
    float a, b, c, l;
  };
  CCE_HOST_DEVICE affine non_target(float s, bool capped) const {
    const float c = slope * mean_logit - baseline * s;
    return capped ? affine{(ce + extra) * s, -gamma * s, c, -slope}
                  : affine{(ce + extra) * s, c - gamma * s, 0.f, -slope};
  }
};

CCE_HOST_DEVICE dlogit_coefficients make_dlogit_coefficients(const loss_terms& t, float g, float lse,
                                                              float target_weight, float target_residual) {
  dlogit_coefficients c;
  c.target_residual = target_residual;
  c.ce = g * (1.f - t.smoothing) * target_weight;
  c.gamma = g * t.smoothing * t.inv_classes;
  c.extra = c.gamma * t.weight_total + g * 2.f * t.z_loss * lse;
  return c;
}

}  // namespace cce
