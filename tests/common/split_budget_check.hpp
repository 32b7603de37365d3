// The filter's split budget as a forward saved it (kernel/portable/split_skip.cuh), checked in float64 from the
// problem's inputs: for every kept row, the mass of the tiles skipped whole (its target's included where it lies in
// them) plus eps / n_tiles for each other tile that the tile maxima skip stays under eps, up to the float rounding
// of the statistics the decision was taken from. Shared by the CPU executor and GPU tests.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <cce/dispatch/plan.hpp>
#include <cce/filter/predicates.hpp>
#include <cce/host/reference.hpp>
#include "random_problem.hpp"

namespace cce::test {

// Returns the number of tiles the budget skipped (whole problem, no vocabulary shards).
template <class T>
std::int64_t check_split_budget(const host_problem<T>& h, const detail::plan& pl, const detail::saved_buffers& sv) {
  const options& o = h.cfg.opts;
  const host::dense_problem x = host::to_dense(h.view(), o);
  const tile::tile_grid& g = pl.grid;
  const float eps = filter::eps_of<T>(o);
  const std::int64_t n_tiles = detail::filter_tiles(g, g.cols);
  const filter::mass_threshold f = filter::mass_threshold::make(eps, g.bn, n_tiles);
  const auto kept = [&](std::int64_t i) { return x.kind[std::size_t(i)] == host::dense_problem::row_kind::kept; };
  std::int64_t skipped = 0;
  double worst = 0.0;  // the largest drop over eps
  std::vector<double> raw, z;
  for (std::int64_t rt = 0; rt < g.row_tiles(); ++rt) {
    const std::int64_t r0 = g.row_begin(rt), r1 = r0 + g.rows_in(rt);
    float floor = detail::inf_f();  // the walk's (dlogit.cuh, tile_row_summary)
    for (std::int64_t i = r0; i < r1; ++i)
      if (kept(i)) floor = detail::min_f(floor, sv.lse_others[i]);
    double reserve = 0.0;  // the tiles the maxima skip outside the skipped splits
    for (std::int64_t ct = 0; ct < g.col_tiles(); ++ct) {
      const std::int64_t tile = rt * g.col_tiles() + ct;
      skipped += sv.split_skip[tile] != 0;
      if (sv.split_skip[tile] == 0 && f.skip(sv.tile_max[tile] - floor)) reserve += double(eps) / double(n_tiles);
    }
    for (std::int64_t i = r0; i < r1; ++i) {
      if (!kept(i)) continue;
      host::detail_reference::row_logits(x, o, i, 1, raw, z);
      const std::int64_t y = x.target[std::size_t(i)];
      double m = -std::numeric_limits<double>::infinity();
      for (std::int64_t v = 0; v < g.cols; ++v) m = std::max(m, z[std::size_t(v)]);
      double others = 0.0, dropped = 0.0;
      for (std::int64_t v = 0; v < g.cols; ++v) {
        const double p = std::exp(z[std::size_t(v)] - m);
        if (v != y) others += p;
        if (sv.split_skip[rt * g.col_tiles() + v / g.bn] != 0) dropped += p;
      }
      worst = std::max(worst, (dropped / others + reserve) / double(eps));
    }
  }
  INFO("largest drop of a row over eps: " << worst);
  CHECK(worst <= 1.0 + 1e-4);
  return skipped;
}

}  // namespace cce::test
