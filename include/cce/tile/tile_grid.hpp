// Index arithmetic of a rows x cols matrix cut into bm x bn tiles, in 64-bit so N*V, N*D and V*D may exceed 2^31.
#pragma once

#include <cstdint>

#include <cce/detail/math.hpp>

namespace cce::tile {

struct tile_grid {
  std::int64_t rows = 0, cols = 0;
  std::int64_t bm = 1, bn = 1;

  CCE_HOST_DEVICE std::int64_t row_tiles() const { return detail::ceil_div(rows, bm); }
  CCE_HOST_DEVICE std::int64_t col_tiles() const { return detail::ceil_div(cols, bn); }
  CCE_HOST_DEVICE std::int64_t tiles() const { return row_tiles() * col_tiles(); }
  CCE_HOST_DEVICE std::int64_t row_begin(std::int64_t i) const { return i * bm; }
  CCE_HOST_DEVICE std::int64_t col_begin(std::int64_t j) const { return j * bn; }
  CCE_HOST_DEVICE std::int64_t rows_in(std::int64_t i) const {
    const std::int64_t left = rows - i * bm;
    return left < bm ? left : bm;
  }
  CCE_HOST_DEVICE std::int64_t cols_in(std::int64_t j) const {
    const std::int64_t left = cols - j * bn;
    return left < bn ? left : bn;
  }
};

// Element offset of (row, col) in a row-major matrix with leading dimension ld.
CCE_HOST_DEVICE std::int64_t offset(std::int64_t row, std::int64_t col, std::int64_t ld) { return row * ld + col; }

// Contiguous slice [begin, end) of `total` items given to part `k` of `parts`, sizes differing by at most one.
CCE_HOST_DEVICE std::int64_t split_begin(std::int64_t total, std::int64_t parts, std::int64_t k) {
  return (total / parts) * k + (k < total % parts ? k : total % parts);
}

// The column tiles [begin, end) of forward vocab split s of `splits`, the splits being runs of `unit_cols`-wide units
// (the forward's CTA tile, a multiple of bn).
struct split_span {
  std::int64_t begin = 0, end = 0;
  CCE_HOST_DEVICE bool contains(std::int64_t col_tile) const { return col_tile >= begin && col_tile < end; }
};
CCE_HOST_DEVICE split_span split_col_tiles(const tile_grid& g, std::int64_t splits, std::int64_t unit_cols,
                                           std::int64_t s) {
  const std::int64_t units = detail::ceil_div(g.cols, unit_cols), per_unit = unit_cols / g.bn;
  const std::int64_t end = split_begin(units, splits, s + 1) * per_unit;
  return {split_begin(units, splits, s) * per_unit, end < g.col_tiles() ? end : g.col_tiles()};
}

// Row tiles whose row-operand tiles (`tile_bytes` each) the CTAs running at once should share: as many as fit in
// about 16 MiB, a third of an H100's or H200's L2, which leaves room for the column-operand tiles they share. Visiting
// tiles in groups of these rows (grouped_order) makes the row operand cross DRAM about once; sweeping all rows of a
// tall problem per column instead streams it again for every few columns.
CCE_HOST_DEVICE int l2_row_group(std::int64_t tile_bytes) {
  const std::int64_t fit = (std::int64_t(16) << 20) / (tile_bytes > 0 ? tile_bytes : 1);
  return int(fit < 1 ? 1 : fit > (std::int64_t(1) << 30) ? (std::int64_t(1) << 30) : fit);
}

// Tile (m, n) of block `block` when blocks sweep `m_tiles` x `n_tiles` output tiles in groups of `group` row tiles
// (any group size: taken into [1, m_tiles]): a group's blocks cover every column tile of its rows before the next
// group starts, so the rows' operand tiles are read from L2 by all the group's column tiles. A bijection of
// [0, m_tiles n_tiles) onto the tiles.
struct grouped_order {
  int m = 0, n = 0;
  CCE_HOST_DEVICE grouped_order(int block, int m_tiles, int n_tiles, int group) {
    group = group < 1 ? 1 : group < m_tiles ? group : m_tiles;
    const int per_group = group * n_tiles;
    const int first_m = (block / per_group) * group;
    const int group_m = m_tiles - first_m < group ? m_tiles - first_m : group;
    const int in_group = block % per_group;
    m = first_m + in_group % group_m;
    n = in_group / group_m;
  }
};

// grouped_order in groups of l2_row_group rows for row-operand tiles of `row_tile_bytes`.
CCE_HOST_DEVICE grouped_order l2_grouped_order(int block, int m_tiles, int n_tiles, std::int64_t row_tile_bytes) {
  return grouped_order(block, m_tiles, n_tiles, l2_row_group(row_tile_bytes));
}

}  // namespace cce::tile
