// The logits of an accumulator fragment, in place: z = transform(acc + bias + low-rank terms) (logit_terms.hpp),
// with the transform in its special-function-unit form (fast_math.cuh). Shared by the kernels that recompute logit
// tiles, so that the forward and the backward see the same z.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cce/epilogue/logit_terms.hpp>
#include <cce/kernel/portable/fast_math.cuh>

namespace cce::detail {

// row0, col0: the tile's origin; rows: the problem's row count; limit: local columns in range; terms_col0: the
// column the terms' pointers hold first (vocabulary sorting gathers them per chunk).
template <class Layout, class Acc, class T>
__device__ __forceinline__ void fragment_logits(Acc& acc, const Layout& f, const logit_terms<T>& terms,
                                                std::int64_t row0, std::int64_t col0, std::int64_t rows, int limit,
                                                std::int64_t terms_col0 = 0) {
  if (terms.has_raw_terms()) {
#pragma unroll
    for (int s = 0; s < Layout::row_slots; ++s)
#pragma unroll
      for (int c = 0; c < Layout::cols; ++c)
        if (row0 + f.row(s) < rows && f.col(c) < limit)
          Layout::at(acc, s, c) = terms.raw(Layout::at(acc, s, c), row0 + f.row(s), col0 + f.col(c) - terms_col0);
  }
  if (terms.transform.softcap > 0.f) {
    const softcap_approx<std::is_same_v<T, float>> cap(terms.transform);
#pragma unroll
    for (int s = 0; s < Layout::row_slots; ++s)
#pragma unroll
      for (int c = 0; c < Layout::cols; ++c) Layout::at(acc, s, c) = cap(Layout::at(acc, s, c));
  } else if (terms.transform.inv_temperature != 1.f) {
#pragma unroll
    for (int s = 0; s < Layout::row_slots; ++s)
#pragma unroll
      for (int c = 0; c < Layout::cols; ++c) Layout::at(acc, s, c) *= terms.transform.inv_temperature;
  }
}

}  // namespace cce::detail
