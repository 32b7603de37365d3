// Gradient-filter predicates: may a (row block x vocab tile) pair be skipped in the backward?
//
// The decision is taken on probabilities, before any scaling by the upstream gradient, weights or 1/N. Skipping
// must be safe on a near-uniform softmax (p = 1/V everywhere), where every single probability is tiny but the
// tiles together carry all the mass. So the predicate bounds the *total* mass that skipping can drop: a tile is
// skipped only if   tile_cols * p_max * n_tiles < eps * (1 - p_y),   where p_max bounds every probability of the
// tile and 1 - p_y is the row's non-target mass (its cross-entropy gradient is proportional to it). Then all
// skipped tiles of a row together hold less than eps of what its gradient is made of. Callers pass
// log(p_max / (1 - p_y)) = tile max logit - (lse + log(1 - p_y)). Target columns are never skipped.
//
// A second rule takes the forward's vocab splits whole (split_budget): per row tile, splits are skipped cheapest
// first while every row's dropped mass stays under eps: the skipped splits' non-target mass (exact, from the
// forward's partials), the target's own where it lies in them (its term may then be taken apart, lone_targets.cuh),
// and eps / n_tiles for each tile that the first bound skips in the other splits. Where one class holds nearly all of
// every row's mass and the rest lie flat (logits compressed by a softcap), tile_cols p_max can stand orders of
// magnitude above the tile's mass, and only the second rule skips the flat splits.
#pragma once

#include <cce/detail/element_type.hpp>
#include <cce/detail/math.hpp>
#include <cce/options.hpp>

namespace cce::filter {

// Never skips: exact mode.
struct none {
  CCE_HOST_DEVICE bool skip(float /*log_p_max*/) const { return false; }
};

// Skips when the tile's mass bound, summed over every tile of the row, stays under eps, or when the split budget
// takes the tile's split whole.
struct mass_threshold {
  float log_threshold = -detail::inf_f();  // log(eps / (tile_cols * n_tiles))

  CCE_HOST_DEVICE static mass_threshold make(float eps, long long tile_cols, long long n_tiles) {
    mass_threshold f;
    if (eps > 0.f)
      f.log_threshold = detail::log_f(eps) - detail::log_f(float(n_tiles)) - detail::log_f(float(tile_cols));
    return f;
  }
  // log_p_max = (max logit of the tile over the block's rows) - (min lse_others over the block's rows). A NaN logit
  // makes it NaN (its row's lse is NaN), which fails the comparison: the tile is kept.
  CCE_HOST_DEVICE bool skip(float log_p_max, bool split_skipped = false) const {
    return log_p_max < log_threshold || split_skipped;
  }
};

// The second rule's budget. A row may drop `row_mass` of its non-target mass: eps, or a vocabulary shard's part of
// it, eps col_tiles / n_tiles (the shards' parts add up to at most eps). Each tile the first rule skips holds under
// `tile_mass` = eps / n_tiles; a split skipped whole releases that reserve for its own such tiles.
struct split_budget {
  static constexpr long long max_splits = 2048;  // ranked per row tile (in a CTA's shared memory); with more, none
  float row_mass = 0.f;
  float tile_mass = 0.f;

  CCE_HOST_DEVICE static split_budget make(float eps, long long col_tiles, long long n_tiles) {
    split_budget b;
    if (eps > 0.f) {
      b.tile_mass = eps / float(n_tiles);
      b.row_mass = b.tile_mass * float(col_tiles);
    }
    return b;
  }
  // What skipping a split adds to a row's drop: its non-target mass in the split (log, from the forward's partial),
  // its target's logit where the target lies there (else -inf), both against the row's lse_others, less the
  // reserve of the split's `first_rule_tiles`. NaN where the row's statistics are.
  CCE_HOST_DEVICE float cost(float log_mass, float target_logit, float lse_others, int first_rule_tiles) const {
    return detail::exp_f(log_mass - lse_others) + detail::exp_f(target_logit - lse_others) -
           tile_mass * float(first_rule_tiles);
  }
  // Whether a row whose drop adds up to `mass` stays within budget (NaN: no).
  CCE_HOST_DEVICE bool admits(float mass) const { return mass <= row_mass; }
};

// A row is near-uniform when every probability is at most (1 + tolerance) / V: then its deviations from the
// baseline 1/V add up to at most 2 tolerance in absolute value (they sum to zero, and the positive ones are each
// under tolerance / V), and the filter may skip them in every tile without a target (docs/api.md). With tolerance
// eps / 2 that is the mass bound's guarantee.
// With a softcap a class draws p_v f_v - 1/V, f_v = 1 - (z_v / cap)^2 (cap = k / T, where z saturates), and a
// skipped class drops (p_v - 1/V) - (1 - f_v) p_v. The row then qualifies at 3/4 of the tolerance (the first terms
// add up to 3/2 tolerance at most), and f_v must stay above 1 - tolerance / 4 where p_v >= e^-2 / V, that is for z_v
// in [z* - 2, z_max], z* = lse - log V (there the second terms add up to tolerance / 4 at most). The classes below
// e^-2 / V number under 3/4 tolerance V / (1 - e^-2), their deviations being negative and summing to under 3/4
// tolerance, so they hold under 0.12 tolerance of mass: the total stays under 2 tolerance.
struct near_uniform {
  float log_bound = -detail::inf_f();  // log((1 + tolerance') / V), tolerance' = 3/4 tolerance with a softcap
  float log_classes = 0.f;             // log V
  float z_bound = detail::inf_f();     // |z| <= cap sqrt(tolerance) / 2 keeps f >= 1 - tolerance / 4

  // `cap`: the logits' saturation k / T with a softcap, infinite without.
  CCE_HOST_DEVICE static near_uniform make(float tolerance, long long classes, float cap = detail::inf_f()) {
    near_uniform f;
    if (!(tolerance > 0.f)) return f;
    const bool capped = cap < detail::inf_f();
    f.log_classes = detail::log_f(float(classes));
    f.log_bound = detail::log1p_f(capped ? 0.75f * tolerance : tolerance) - f.log_classes;
    if (capped) f.z_bound = 0.5f * cap * detail::sqrt_f(tolerance);
    return f;
  }
  // z_max bounds every logit of the row (its row tile's largest tile max); lse is the row's. NaN fails.
  CCE_HOST_DEVICE bool holds(float z_max, float lse) const {
    const float z_flat = lse - log_classes;  // where p = 1/V
    return z_max - lse <= log_bound && detail::abs_f(z_max) <= z_bound && detail::abs_f(z_flat - 2.f) <= z_bound;
  }
};

// To first order (row_loss.hpp; no bias) a row with mean logit zbar drops 1 - kappa, kappa = exp(zbar - lse) V:
// it qualifies when that is at most 2 tolerance, the bound of the baseline 1/V. The column sums that zbar needs are
// taken only once some row is `plausible`: its largest logit within a few standard deviations of flat (1 - kappa is
// about half the logits' variance), a heuristic that decides only whether the test runs.
// With a softcap the share is linear in z = raw / T while the softmax sees y = c tanh(z / c) (c = k / T) and a class
// draws p f, f = 1 - (y / c)^2. If every |z| is at most `bound` (|e| max_v |c_v| / T), then |z - y| <= bound^3 / (3
// c^2) = delta and 1 - f <= (bound / c)^2 = x2, and the drop grows by at most 2 (e^delta - 1) (the softmax of y
// against that of z, twice: its mass and its deviation), delta (the walk's draws take y where the share takes z) and
// 2 x2 (the factor at the other classes and at the target, whose one-hot term is taken at f = 1).
struct near_uniform_linear {
  float log_kappa_floor = detail::inf_f();  // log(1 - 2 tolerance): nothing qualifies at +inf
  float log_classes = 0.f;
  float plausible_bound = -detail::inf_f();  // on z_max - (lse - log V)
  float twice_tolerance = 0.f;
  float inv_cap2 = 0.f;  // 1 / c^2 with a softcap, else 0

  // `cap`: the logits' saturation k / T with a softcap, infinite without.
  CCE_HOST_DEVICE static near_uniform_linear make(float tolerance, long long classes, float cap = detail::inf_f()) {
    near_uniform_linear f;
    if (!(tolerance > 0.f)) return f;
    f.log_classes = detail::log_f(float(classes));
    f.log_kappa_floor = 2.f * tolerance < 1.f ? detail::log1p_f(-2.f * tolerance) : -detail::inf_f();
    f.plausible_bound = detail::log_f(2.f) + 8.f * detail::sqrt_f(tolerance);
    f.twice_tolerance = 2.f * tolerance;
    if (cap < detail::inf_f()) f.inv_cap2 = 1.f / (cap * cap);
    return f;
  }
  CCE_HOST_DEVICE bool plausible(float z_max, float lse) const {
    return z_max - (lse - log_classes) <= plausible_bound;
  }
  // log kappa of a row with mean logit zbar; the row qualifies when it is at least log_kappa_floor (NaN fails).
  CCE_HOST_DEVICE float log_kappa(float mean_logit, float lse) const { return mean_logit - (lse - log_classes); }
  // What the softcap adds to the drop of a row whose |z| stay within `bound` (e^delta - 1 <= delta e^delta).
  CCE_HOST_DEVICE float softcap_drop(float bound) const {
    const float x2 = bound * bound * inv_cap2, delta = bound * x2 / 3.f;
    return 2.f * delta * detail::exp_f(delta) + delta + 2.f * x2;
  }
  // `bound`: on every |z| of the row, needed with a softcap only.
  CCE_HOST_DEVICE bool holds(float mean_logit, float lse, float bound = 0.f) const {
    const float log_k = log_kappa(mean_logit, lse);
    if (inv_cap2 == 0.f) return log_k >= log_kappa_floor;
    const float room = twice_tolerance - softcap_drop(bound);  // NaN fails
    return room > 0.f && (room >= 1.f || log_k >= detail::log1p_f(-room));
  }
};

// eps = machine epsilon of the element type / 32 (bf16 2^-12, fp16 2^-15, fp32 2^-28).
template <class T>
constexpr float auto_eps() noexcept {
  return detail::element_traits<T>::epsilon / 32;
}

// The eps of options `o` for element type T, and the near-uniform tolerance (options::uniform_tolerance).
template <class T>
float eps_of(const options& o) {
  return o.filter == filter_mode::threshold ? o.filter_eps : auto_eps<T>();
}
template <class T>
float uniform_tolerance_of(const options& o) {
  return o.uniform_tolerance > 0.f ? o.uniform_tolerance : 0.5f * eps_of<T>(o);
}

// The near-uniform test of options `o` over `classes` classes.
template <class T>
near_uniform near_uniform_of(const options& o, long long classes) {
  const float cap = o.softcap > 0.f ? o.softcap / o.temperature : detail::inf_f();
  return near_uniform::make(uniform_tolerance_of<T>(o), classes, cap);
}
template <class T>
near_uniform_linear near_uniform_linear_of(const options& o, long long classes) {
  const float cap = o.softcap > 0.f ? o.softcap / o.temperature : detail::inf_f();
  return near_uniform_linear::make(uniform_tolerance_of<T>(o), classes, cap);
}

}  // namespace cce::filter
