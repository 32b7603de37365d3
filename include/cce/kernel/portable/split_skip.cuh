// The filter's second rule (filter/predicates.hpp, split_budget): for each row tile, the forward vocab splits whose
// tiles the backward skips whole. The forward's (row, split) partials hold each split's non-target mass exactly, and
// the finaliser has given every row its lse_others, so each row's share of each split is known. The splits are
// ranked by their largest cost over the tile's kept rows, and the longest prefix of that ranking that every row's
// budget admits is skipped: a row's drop is then under eps in all (the tiles the first rule skips in the other splits
// counted at eps / n_tiles each). On rows whose one dominant class stands a softcap's compressed distance above a
// flat rest, the tile maxima bound the flat tiles orders of magnitude above the mass they hold, and a bound per split
// (eps t_s / n_tiles each) fails on the rows whose rest holds a little more than the average; the shared budget
// still takes most of those splits.
#pragma once

#include <cstdint>

#include <cub/block/block_reduce.cuh>

#include <cce/detail/math.hpp>
#include <cce/detail/targets.hpp>
#include <cce/epilogue/row_partial.hpp>
#include <cce/filter/predicates.hpp>
#include <cce/tile/tile_grid.hpp>

namespace cce::detail {

struct split_skip_params {
  const row_partial* partials = nullptr;  // rows x splits, from the block's first row
  const float* target_logit = nullptr;    // from the block's first row
  const float* lse_others = nullptr;      // from the block's first row
  target_reader labels;                   // the block's
  const float* tile_max = nullptr;        // row_tiles x col_tiles of the grid
  std::int64_t first_tile = 0;            // the block's first row tile
  tile::tile_grid grid;                   // N x V
  std::int64_t splits = 1;
  std::int64_t split_cols = 0;  // columns of the forward's split unit (its CTA tile), a multiple of grid.bn
  filter::mass_threshold filter;
  filter::split_budget budget;
  std::uint8_t* skip = nullptr;  // row_tiles x col_tiles of the grid
};

// The ranking's loop over the keys loads whole 16-byte vectors, up to 3 floats past the last key: their array is
// padded to a multiple of 4 so that those loads never touch the ranks being written.
__host__ __device__ inline std::int64_t ranked_keys(std::int64_t splits) { return (splits + 3) / 4 * 4; }
// A row's statistics, read from global memory once: every split's cost of the row needs them.
struct split_row {
  float lse_others = 0.f, target_logit = 0.f;
  std::int32_t split = -1;  // the split holding the target, -1 where the shard does not hold it
  std::int32_t kept = 0;
};
// Shared memory for the ranking of `splits` (at most filter::split_budget::max_splits), the splits' first tiles and
// `rows` rows' statistics.
inline std::size_t split_skip_smem_bytes(std::int64_t splits, std::int64_t rows) {
  return std::size_t(ranked_keys(splits) + 4 * splits + 1) * 4 + std::size_t(rows) * sizeof(split_row);
}

// One CTA per row tile of the block.
template <int Threads>
__global__ void __launch_bounds__(Threads) split_skip_kernel(const __grid_constant__ split_skip_params prm) {
  using reduce_float = cub::BlockReduce<float, Threads>;
  using reduce_int = cub::BlockReduce<int, Threads>;
  __shared__ union {
    typename reduce_float::TempStorage f;
    typename reduce_int::TempStorage i;
  } tmp;
  __shared__ float floor_shared;
  __shared__ int int_shared;
  extern __shared__ float split_smem[];
  const std::int64_t splits = prm.splits;
  float* key = split_smem;                                         // largest cost over the kept rows (NaN: +inf)
  int* order = reinterpret_cast<int*>(key + ranked_keys(splits));  // splits by rank
  int* rank = order + splits;
  int* first_rule = rank + splits;        // tiles the first rule skips
  int* first_tile = first_rule + splits;  // split s holds the column tiles [first_tile[s], first_tile[s + 1])
  split_row* row = reinterpret_cast<split_row*>(first_tile + splits + 1);

  const tile::tile_grid& g = prm.grid;
  const std::int64_t rt = prm.first_tile + blockIdx.x, first_row = std::int64_t(blockIdx.x) * g.bm;
  const std::int64_t rows = g.rows_in(rt);

  // The splits' column tiles (tile::split_col_tiles), worked out once: taken per (row, split) in the costs below,
  // their 64-bit divisions made up a third of the kernel's time.
  for (std::int64_t s = threadIdx.x; s < splits; s += Threads) {
    const std::int64_t begin = tile::split_col_tiles(g, splits, prm.split_cols, s).begin;
    first_tile[s] = int(begin < g.col_tiles() ? begin : g.col_tiles());
  }
  if (threadIdx.x == 0) first_tile[splits] = int(g.col_tiles());
  __syncthreads();
  // The split holding column tile ct < col_tiles: the last whose first tile is at most ct (an empty split's first
  // tile is the next one's).
  const auto split_of = [&](int ct) {
    int lo = 0, hi = int(splits);
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (first_tile[mid] <= ct)
        lo = mid;
      else
        hi = mid;
    }
    return lo;
  };

  // The rows' statistics, and the first rule's floor, as the walk's (dlogit.cuh, tile_row_summary): the kept rows'
  // smallest lse_others.
  float floor = inf_f();
  for (std::int64_t r = threadIdx.x; r < rows; r += Threads) {
    const row_label lab = prm.labels(first_row + r);
    split_row x;
    x.kept = lab.kind == row_label::kept;
    if (x.kept) {
      x.lse_others = prm.lse_others[first_row + r];
      x.target_logit = prm.target_logit[first_row + r];
      const std::int64_t col = prm.labels.column(lab);
      x.split = col >= 0 ? split_of(int(col / g.bn)) : -1;
      floor = min_f(floor, x.lse_others);
    }
    row[r] = x;
  }
  floor = reduce_float(tmp.f).Reduce(floor, [](float a, float b) { return min_f(a, b); });
  if (threadIdx.x == 0) floor_shared = floor;
  __syncthreads();
  floor = floor_shared;

  // A row's cost of split s, whose first rule skips `first_rule_tiles`: its mass there, its target's where the target
  // lies there.
  const auto cost = [&](std::int64_t r, std::int64_t s, int first_rule_tiles) {
    const split_row& x = row[r];
    return prm.budget.cost(prm.partials[(first_row + r) * splits + s].softmax.lse(),
                           x.split == s ? x.target_logit : -inf_f(), x.lse_others, first_rule_tiles);
  };
  // A warp per split, its lanes over the split's tiles, then over the rows: the tiles the first rule skips there,
  // then the split's largest cost over the kept rows.
  const int lane = threadIdx.x % 32;
  int reserved = 0;  // lane 0's: the first rule's tiles in the warp's splits
  for (std::int64_t s = threadIdx.x / 32; s < splits; s += Threads / 32) {
    int n = 0;
    for (int ct = first_tile[s] + lane; ct < first_tile[s + 1]; ct += 32)
      n += prm.filter.skip(prm.tile_max[rt * g.col_tiles() + ct] - floor);
    n = __reduce_add_sync(0xffffffffu, n);
    float m = -inf_f();  // max_f keeps a NaN
#pragma unroll 4
    for (std::int64_t r = lane; r < rows; r += 32)
      if (row[r].kept) m = max_f(m, cost(r, s, n));
#pragma unroll
    for (int mask = 16; mask > 0; mask /= 2) m = max_f(m, __shfl_xor_sync(0xffffffffu, m, mask));
    if (lane == 0) {
      first_rule[s] = n;
      key[s] = m == m ? m : inf_f();
      reserved += n;
    }
  }
  reserved = reduce_int(tmp.i).Sum(reserved);
  if (threadIdx.x == 0) int_shared = reserved;
  __syncthreads();
  reserved = int_shared;
  for (std::int64_t s = threadIdx.x; s < splits; s += Threads) {  // cheapest first, ties by index
    int k = 0;
    for (std::int64_t j = 0; j < splits; ++j) k += key[j] < key[s] || (key[j] == key[s] && j < s);
    order[k] = int(s);
    rank[s] = k;
  }
  __syncthreads();

  // The longest prefix of the ranking within every kept row's budget: each row's costs added in rank order, the
  // loads of `batch` ranks issued before their sums.
  constexpr int batch = 8;
  int prefix = int(splits);
  for (std::int64_t r = threadIdx.x; r < rows; r += Threads) {
    if (!row[r].kept) continue;
    float spent = prm.budget.tile_mass * float(reserved);
    int k = 0;
    for (bool within = true; within && k < prefix;) {
      float c[batch];
#pragma unroll
      for (int u = 0; u < batch; ++u) {
        c[u] = k + u < prefix ? cost(r, order[k + u], first_rule[order[k + u]]) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < batch; ++u) {
        if (!within || k >= prefix) continue;
        spent += c[u];
        if (key[order[k]] < inf_f() && prm.budget.admits(spent))
          ++k;
        else
          within = false;
      }
    }
    prefix = k;
  }
  prefix = reduce_int(tmp.i).Reduce(prefix, [](int a, int b) { return a < b ? a : b; });
  if (threadIdx.x == 0) int_shared = prefix;
  __syncthreads();
  prefix = int_shared;
  for (std::int64_t s = threadIdx.x / 32; s < splits; s += Threads / 32) {
    for (int ct = first_tile[s] + lane; ct < first_tile[s + 1]; ct += 32)
      prm.skip[rt * g.col_tiles() + ct] = rank[s] < prefix;
  }
}

}  // namespace cce::detail
