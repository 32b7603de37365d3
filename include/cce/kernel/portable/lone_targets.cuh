// Lone targets: a row whose target lies in a tile the filter would skip but for that target (the tile's largest
// logit, the target's included, is negligible against the row tile's log-sum-exp) leaves the target's term
// ce (p_y - 1) dz/draw(z_y) to two sparse updates after the walk, and the tile is skipped like any other. On data
// whose mass sits away from the targets (a classifier early in training, the benchmark's peaked data) the target
// tiles are most of what the walk would otherwise compute: with 128-row tiles and random targets, each row tile
// holds a target in 1 - (1 - 128/V)^128 of its 128-class tiles, 40 % at V = 32,064.
//
// The decision uses the forward's tile maxima with the same floor as the walk's (dlogit.cuh, tile_row_summary), or
// the filter's split budget, which counted the target's own mass where it lies in a skipped split
// (split_skip.cuh), so that a row's target is apart only where its tile is skipped. Rows that take
// a baseline are not lone (their draws are deviations from it). The terms go where those of the rows taking a baseline
// go (uniform_baseline_buffers::target_scale): to onehot_rows_kernel and onehot_classes_kernel (uniform_baseline.cuh),
// which add them to the gradients as written once the walk and the share's products are done (a 16-bit gradient is
// rounded once more).
#pragma once

#include <cstdint>

#include <cce/detail/element_type.hpp>
#include <cce/detail/math.hpp>
#include <cce/dispatch/plan.hpp>
#include <cce/epilogue/logit_transform.hpp>
#include <cce/epilogue/row_output.hpp>
#include <cce/filter/predicates.hpp>
#include <cce/kernel/portable/dlogit.cuh>
#include <cce/kernel/portable/warp_reduce.cuh>
#include <cce/tile/tile_grid.hpp>

namespace cce::detail {

struct lone_target_params {
  const void* e = nullptr;  // of T, row r0 first
  const void* c = nullptr;  // of T
  std::int64_t lde = 0, ldc = 0, n = 0, d = 0;
  tile::tile_grid grid;             // N x V
  std::int64_t first_tile = 0;      // r0 / bm
  const float* tile_max = nullptr;  // the forward's
  const std::uint8_t* split_skip = nullptr;
  filter::mass_threshold filter{};
  logit_transform transform{};
  row_coefficients* coef = nullptr;  // of every row (from row 0, as the walk's)
  float* target_scale = nullptr;     // from r0
  std::int32_t* target_class = nullptr;
  int* state = nullptr;
};

// Rows of a row tile that one launch spreads over as many CTAs: a softcap's dot products are most of the work.
inline constexpr int lone_target_ctas_per_tile = 4;

// Grid: (row tiles, lone_target_ctas_per_tile). Each CTA takes the floor of its row tile's kept rows (the walk's,
// tile_row_summary), then each of its rows whose target tile passes the filter's skip test gives its target term to
// target_scale (-ce target_residual dz/draw(z_y), z_y recomputed by a warp under a softcap) and no longer names a
// target to the walk.
template <class T, int Threads>
__global__ void __launch_bounds__(Threads) lone_targets_kernel(const __grid_constant__ lone_target_params prm) {
  const tile::tile_grid& g = prm.grid;
  const std::int64_t rt = prm.first_tile + blockIdx.x, first = std::int64_t(blockIdx.x) * g.bm;
  const std::int64_t rows = g.rows_in(rt);
  const float min_floor = tile_row_summary<Threads>(prm.coef, g, rt, 0).min_floor;  // any column tile: the same
  const T* c = static_cast<const T*>(prm.c);
  const int lane = threadIdx.x % 32;
  const std::int64_t step = std::int64_t(gridDim.y) * (Threads / 32);  // a warp per row
  for (std::int64_t r = blockIdx.y + std::int64_t(gridDim.y) * (threadIdx.x / 32); r < rows; r += step) {
    row_coefficients& rc = prm.coef[g.row_begin(rt) + r];
    // A row that takes a baseline keeps its target (without the share) or has left it already (with it).
    if (!rc.kept || rc.target < 0 || rc.dz.baseline != 0.f) continue;
    const std::int32_t target = rc.target;
    const std::int64_t tile = rt * g.col_tiles() + target / g.bn;
    // The tile's maximum (the target's logit included) or the split budget (the target's mass included): the row's
    // draw at its target has terms beyond the one taken apart (the z-loss's) that scale with p_y. NaN: not skipped.
    if (!prm.filter.skip(prm.tile_max[tile] - min_floor, prm.split_skip[tile] != 0)) continue;
    // The softcap's derivative at the target.
    const float raw = prm.transform.softcap > 0.f ? warp_dot(static_cast<const T*>(prm.e) + (first + r) * prm.lde,
                                                             c + std::int64_t(target) * prm.ldc, prm.d, lane)
                                                  : 0.f;
    const float derivative = prm.transform.derivative(raw);
    __syncwarp();
    if (lane == 0) {
      prm.target_scale[first + r] = -rc.dz.ce * rc.dz.target_residual * derivative;
      prm.target_class[first + r] = target;
      rc.target = -1;
      prm.state[4] = 1;
    }
  }
}

}  // namespace cce::detail
