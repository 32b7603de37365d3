// The sm_90a forward's units of work as the host plans and launches them: a unit is the run of 256-class tiles of one
// vocab split for 128 rows, taken by a CTA or by a cluster of two CTAs of neighbouring row tiles sharing C stages.
// Plain C++, so that the plan (plan.hpp, also compiled without nvcc) and the kernel (forward.cuh) read the same facts.
#pragma once

#include <cstdint>

#include <cce/detail/math.hpp>

namespace cce::detail::sm90 {

struct forward_unit_shape {
  static constexpr int rows = 128;     // per CTA (logit_tile_shape::bm)
  static constexpr int classes = 256;  // per tile (logit_tile_shape::bn)
  static constexpr int depth = 64;     // per k-block (logit_tile_shape::bk)
};
inline constexpr int forward_cluster = 2;  // CTAs of neighbouring row tiles sharing C stages

// Whether each CTA of the forward of `classes` x `depth` in `splits` vocab splits walks at least 512 k-blocks: long
// enough to pay for padding the grid's rows to whole clusters, and to take its unit as a cluster of its own.
inline bool long_class_runs(std::int64_t classes, std::int64_t depth, std::int64_t splits) {
  using S = forward_unit_shape;
  return ceil_div(ceil_div(classes, S::classes), splits) * ceil_div(depth, S::depth) >= 512;
}

// Whether the forward of `row_tiles` runs in clusters sharing C stages: where no CTA pads the grid (an even number of
// row tiles), or with long runs. Halving the classifier's L2 traffic took 2-12 % off phi3.5's forward, whose runs
// are short, in three comparisons on an H100 (docs/performance.md).
inline bool shares_classifier(std::int64_t row_tiles, std::int64_t classes, std::int64_t depth, std::int64_t splits) {
  return row_tiles % forward_cluster == 0 || long_class_runs(classes, depth, splits);
}

}  // namespace cce::detail::sm90
