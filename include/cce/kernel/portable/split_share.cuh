// The filter's second statistic (filter/predicates.hpp, mass_threshold): for each row tile and forward vocab split,
// the largest log non-target mass log S_rs that the split's classes hold for one of the tile's rows (the split's
// partial, its target left out as in the forward), written to every filter tile of the split less log of their
// count. The backward subtracts the tile rows' smallest non-target lse, as from the tile maxima. Those bound a tile's
// mass by tile_cols times its largest probability; on rows whose one dominant class stands a softcap's compressed
// distance above a flat rest, that bound is orders of magnitude above the mass the split actually holds.
#pragma once

#include <cstdint>

#include <cce/detail/math.hpp>
#include <cce/epilogue/row_partial.hpp>
#include <cce/kernel/portable/warp_reduce.cuh>
#include <cce/tile/tile_grid.hpp>

namespace cce::detail {

struct split_share_params {
  const row_partial* partials = nullptr;  // rows x splits from the block's first row
  std::int64_t first_tile = 0;            // the block's first row tile
  tile::tile_grid grid;                   // N x V
  std::int64_t splits = 1;
  std::int64_t split_cols = 0;  // columns of the forward's split unit (its CTA tile), a multiple of grid.bn
  float* share = nullptr;       // row_tiles x col_tiles of the grid
};

// A warp per (row tile, split): the block's row tiles along x, Warps splits per CTA along y.
template <int Warps>
__global__ void __launch_bounds__(32 * Warps) split_share_kernel(const __grid_constant__ split_share_params prm) {
  const tile::tile_grid& g = prm.grid;
  const std::int64_t s = std::int64_t(blockIdx.y) * Warps + threadIdx.x / 32;
  if (s >= prm.splits) return;
  const int lane = threadIdx.x % 32;
  const std::int64_t rt = prm.first_tile + blockIdx.x, first_row = std::int64_t(blockIdx.x) * g.bm;
  float m = -inf_f();  // max_f keeps a NaN: a NaN row keeps its tiles
  for (std::int64_t r = lane; r < g.rows_in(rt); r += 32)
    m = max_f(m, prm.partials[(first_row + r) * prm.splits + s].softmax.lse());
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) m = max_f(m, shuffle_xor(m, mask));
  const std::int64_t units = ceil_div(g.cols, prm.split_cols), per_unit = prm.split_cols / g.bn;
  const std::int64_t ft0 = tile::split_begin(units, prm.splits, s) * per_unit;
  const std::int64_t end = tile::split_begin(units, prm.splits, s + 1) * per_unit;
  const std::int64_t ft1 = end < g.col_tiles() ? end : g.col_tiles();
  const float value = m - log_f(float(ft1 - ft0));
  for (std::int64_t ct = ft0 + lane; ct < ft1; ct += 32) prm.share[rt * g.col_tiles() + ct] = value;
}

}  // namespace cce::detail
