// The baseline of near-uniform rows (epilogue/row_loss.hpp, filter/predicates.hpp): each row tile's largest tile
// max, which decides the rows; and the column sums through which the products add the baseline's share back for
// every class: the sum of C's rows (into dE) and the rows' baselines times E (into dC, their sum into dBias).
// Each sum splits its rows into a fixed number of parts added in order, so it is the same on every run; nothing
// is computed while no row is near-uniform (uniform_baseline_buffers::state), and the classifier's sums once.
#pragma once

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <cstdint>

#include <cce/detail/element_type.hpp>
#include <cce/detail/math.hpp>
#include <cce/dispatch/plan.hpp>
#include <cce/tile/tile_grid.hpp>

namespace cce::detail {

// block_max[rt] = the largest of row tile rt's tile maxima (NaN wins: such a row tile takes no baseline), for the
// row tiles of one launch: grid = their count, from first_tile.
template <int Threads>
__global__ void __launch_bounds__(Threads)
    row_tile_max_kernel(const float* tile_max, std::int64_t col_tiles, std::int64_t first_tile, float* block_max) {
  using reduce = cub::BlockReduce<float, Threads>;
  __shared__ typename reduce::TempStorage tmp;
  const std::int64_t rt = first_tile + blockIdx.x;
  float m = -inf_f();
  for (std::int64_t ct = threadIdx.x; ct < col_tiles; ct += Threads) m = max_f(m, tile_max[rt * col_tiles + ct]);
  m = reduce(tmp).Reduce(m, [](float a, float b) { return max_f(a, b); });
  if (threadIdx.x == 0) block_max[rt] = m;
}

// Which column sums a launch computes: the classifier's rows (each of weight 1, once) or the rows of E weighted by
// their baselines (and column D: the baselines' sum).
enum class baseline_sum : int { classes, rows };

// Rows the baseline's column sums add per split: the split count follows from the row count alone.
inline constexpr std::int64_t baseline_rows_per_split = 512;
inline std::int64_t baseline_splits(std::int64_t rows) {
  return std::clamp<std::int64_t>(ceil_div(rows, baseline_rows_per_split), 1, plan::max_baseline_splits);
}

// partial[split][col] = sum over the split's rows i of weight_i x[i][col] (col < d), and of weight_i at col = d.
// Grid: (ceil((d + 1) / threads), splits). The class sums run first and mark nothing; the row sums, which run next
// and reuse `partial`, mark the class sums done (state[1]), so that later calls neither recompute nor overwrite
// them (loss_and_grad's row blocks).
template <class T, baseline_sum Sum>
__global__ void baseline_partial_kernel(const T* x, std::int64_t ldx, std::int64_t rows, std::int64_t d,
                                        const float* weights, std::int64_t splits, int* state, float* partial) {
  if (!state[0] || (Sum == baseline_sum::classes && state[1])) return;  // nothing to add, or the sums are there
  const std::int64_t col = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (Sum == baseline_sum::rows && col == 0 && blockIdx.y == 0) state[1] = 1;
  if (col > d) return;
  const std::int64_t r0 = tile::split_begin(rows, splits, blockIdx.y);
  const std::int64_t r1 = tile::split_begin(rows, splits, blockIdx.y + 1);
  float s = 0.f;
  for (std::int64_t i = r0; i < r1; ++i) {
    const float w = Sum == baseline_sum::classes ? 1.f : weights[i];
    s += w * (col < d ? to_float(x[i * ldx + col]) : 1.f);
  }
  partial[std::int64_t(blockIdx.y) * (d + 1) + col] = s;
}

// out[col] = the splits' partials in order, for col < count. Without a near-uniform row the row sums are 0 and the
// class sums stay as set (0); once done, the class sums stay.
template <baseline_sum Sum>
__global__ void baseline_total_kernel(const float* partial, std::int64_t d, std::int64_t count, std::int64_t splits,
                                      const int* state, float* out) {
  const std::int64_t col = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= count || (Sum == baseline_sum::classes && state[1])) return;
  if (!state[0]) {
    if (Sum == baseline_sum::rows) out[col] = 0.f;
    return;
  }
  float s = 0.f;
  for (std::int64_t k = 0; k < splits; ++k) s += partial[k * (d + 1) + col];
  out[col] = s;
}

}  // namespace cce::detail
