// Gradient-filter predicates: may a (row block x vocab tile) pair be skipped in the backward?
//
// The decision is taken on probabilities, before any scaling by the upstream gradient, weights or 1/N. Skipping
// must be safe on a near-uniform softmax (p = 1/V everywhere), where every single probability is tiny but the
// tiles together carry all the mass. So the predicate bounds the *total* mass that skipping can drop: a tile is
// skipped only if   tile_cols * p_max * n_tiles < eps * (1 - p_y),   where p_max bounds every probability of the
// tile and 1 - p_y is the row's non-target mass (its cross-entropy gradient is proportional to it). Then all
// skipped tiles of a row together hold less than eps of what its gradient is made of. Callers pass
// log(p_max / (1 - p_y)) = tile max logit - (lse + log(1 - p_y)). Target columns are never skipped.
#pragma once

#include <cce/detail/element_type.hpp>
#include <cce/detail/math.hpp>
#include <cce/options.hpp>

namespace cce::filter {

// Never skips: exact mode.
struct none {
  CCE_HOST_DEVICE bool skip(float /*log_p_max*/) const { return false; }
};

// Skips when the tile's mass bound, summed over every tile of the row, stays under eps.
struct mass_threshold {
  float log_threshold = -detail::inf_f();  // log(eps / (tile_cols * n_tiles))

  CCE_HOST_DEVICE static mass_threshold make(float eps, long long tile_cols, long long n_tiles) {
    mass_threshold f;
    if (eps > 0.f) f.log_threshold = detail::log_f(eps) - detail::log_f(float(tile_cols) * float(n_tiles));
    return f;
  }
  // log_p_max = (max logit of the tile over the block's rows) - (min lse over the block's rows).
  CCE_HOST_DEVICE bool skip(float log_p_max) const { return log_p_max < log_threshold; }
};

// A row is near-uniform when every probability is at most (1 + tolerance) / V: then its deviations from the
// baseline 1/V add up to at most 2 tolerance in absolute value (they sum to zero, and the positive ones are each
// under tolerance / V), and the filter may skip them in every tile without a target (docs/api.md). With tolerance
// eps / 2 that is the mass bound's guarantee. Callers pass log(p_max) = (max logit over the row's tiles) - lse.
struct near_uniform {
  float log_bound = -detail::inf_f();  // log((1 + tolerance) / V)

  CCE_HOST_DEVICE static near_uniform make(float tolerance, long long classes) {
    near_uniform f;
    if (tolerance > 0.f) f.log_bound = detail::log1p_f(tolerance) - detail::log_f(float(classes));
    return f;
  }
  CCE_HOST_DEVICE bool holds(float log_p_max) const { return log_p_max <= log_bound; }
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

}  // namespace cce::filter
