// What one vocab slice contributes to a row: online softmax statistics, the weighted logit sum of label
// smoothing and the running argmax. Split-V partials of a row merge in a fixed order in the finaliser, so the
// result does not depend on how many CTAs ran.
#pragma once

#include <cstdint>

#include <cce/reduce/argmax.hpp>
#include <cce/reduce/online_softmax.hpp>

namespace cce {

struct row_partial {
  softmax_stats softmax{};
  float weighted_logit_sum = 0.f;  // sum_v w_v z_v
  float argmax_value = -detail::inf_f();
  std::int32_t argmax_index = -1;

  // in_softmax = false leaves z out of the softmax statistics (a kept row's target) but not out of the rest.
  CCE_HOST_DEVICE void push(float z, float class_weight, std::int32_t col, bool in_softmax = true) {
    if (in_softmax) softmax = softmax_push(softmax, z);
    weighted_logit_sum += class_weight * z;
    if (argmax_better(z, col, argmax_value, argmax_index)) {
      argmax_value = z;
      argmax_index = col;
    }
  }
};

CCE_HOST_DEVICE row_partial merge(const row_partial& a, const row_partial& b) {
  row_partial r;
  r.softmax = softmax_merge(a.softmax, b.softmax);
  r.weighted_logit_sum = a.weighted_logit_sum + b.weighted_logit_sum;
  const bool a_wins = argmax_better(a.argmax_value, a.argmax_index, b.argmax_value, b.argmax_index);
  r.argmax_value = a_wins ? a.argmax_value : b.argmax_value;
  r.argmax_index = a_wins ? a.argmax_index : b.argmax_index;
  return r;
}

namespace detail {

// The finaliser's source of rows for one problem: the forward's split partials of the row, merged in split order,
// and the target logit the forward set aside.
struct split_rows {
  const row_partial* partials = nullptr;  // N x splits
  std::int64_t splits = 1;
  const float* target_logit = nullptr;    // N: z_y of kept rows

  // target: the row's target, -1 when it has none. The loads of `ahead` partials are issued before their merges (a
  // thread per row merging each as it arrives waits on memory once per split).
  CCE_HOST_DEVICE bool read(std::int64_t row, std::int64_t target, row_partial& merged, float& z_target) const {
    constexpr int ahead = 8;
    const row_partial* p = partials + row * splits;
    merged = p[0];
    std::int64_t s = 1;
    for (; s + ahead <= splits; s += ahead) {
      row_partial next[ahead];
      for (int u = 0; u < ahead; ++u) next[u] = p[s + u];
      for (int u = 0; u < ahead; ++u) merged = merge(merged, next[u]);
    }
    for (; s < splits; ++s) merged = merge(merged, p[s]);
    z_target = target >= 0 ? target_logit[row] : 0.f;
    return true;
  }
};

}  // namespace detail
}  // namespace cce
