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
#include <cce/kernel/portable/warp_reduce.cuh>
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
// Shared memory for the ranking of `splits` (at most filter::split_budget::max_splits).
inline std::size_t split_skip_smem_bytes(std::int64_t splits) {
  return std::size_t(ranked_keys(splits) + 3 * splits) * 4;
}

// One CTA per row tile of the block. The costs are read a warp per row, its lanes over the splits, whose partials lie
// side by side.
template <int Threads>
__global__ void __launch_bounds__(Threads) split_skip_kernel(const __grid_constant__ split_skip_params prm) {
  constexpr int warps = Threads / 32;
  constexpr unsigned all = 0xffffffffu;
  using reduce_float = cub::BlockReduce<float, Threads>;
  using reduce_int = cub::BlockReduce<int, Threads>;
  __shared__ union {
    typename reduce_float::TempStorage f;
    typename reduce_int::TempStorage i;
  } tmp;
  __shared__ float floor_shared;
  __shared__ int reserved_shared, finite_keys, prefix_shared;
  extern __shared__ float split_smem[];
  const std::int64_t splits = prm.splits;
  float* key = split_smem;  // largest cost over the kept rows (NaN: +inf)
  int* order = reinterpret_cast<int*>(key + ranked_keys(splits));  // splits by rank
  int* rank = order + splits;
  int* first_rule = rank + splits;  // tiles the first rule skips

  const tile::tile_grid& g = prm.grid;
  const std::int64_t rt = prm.first_tile + blockIdx.x, first_row = std::int64_t(blockIdx.x) * g.bm;
  const std::int64_t rows = g.rows_in(rt);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  // The first rule's floor, as the walk's (dlogit.cuh, tile_row_summary): the kept rows' smallest lse_others.
  float floor = inf_f();
  for (std::int64_t r = threadIdx.x; r < rows; r += Threads)
    if (prm.labels(first_row + r).kind == row_label::kept) floor = min_f(floor, prm.lse_others[first_row + r]);
  floor = reduce_float(tmp.f).Reduce(floor, [](float a, float b) { return min_f(a, b); });
  if (threadIdx.x == 0) {
    floor_shared = floor;
    finite_keys = 0;
    prefix_shared = int(splits);
  }
  __syncthreads();
  floor = floor_shared;

  int reserved = 0;
  for (std::int64_t s = threadIdx.x; s < splits; s += Threads) {
    const tile::split_span t = tile::split_col_tiles(g, splits, prm.split_cols, s);
    int n = 0;
    for (std::int64_t ct = t.begin; ct < t.end; ++ct)
      n += prm.filter.skip(prm.tile_max[rt * g.col_tiles() + ct] - floor);
    first_rule[s] = n;
    key[s] = -inf_f();
    reserved += n;
  }
  __syncthreads();
  reserved = reduce_int(tmp.i).Sum(reserved);
  if (threadIdx.x == 0) reserved_shared = reserved;

  // A kept row's statistics, and its cost of split s: its mass there, its target's where the target lies there.
  struct kept_row {
    std::int64_t row;
    std::int32_t col;  // the target's column, -1 where the shard does not hold it
    float target_logit, lse_others;
  };
  const auto cost = [&](const kept_row& k, std::int64_t s) {
    const tile::split_span t = tile::split_col_tiles(g, splits, prm.split_cols, s);
    const bool target_here = k.col >= 0 && k.col / g.bn >= t.begin && k.col / g.bn < t.end;
    return prm.budget.cost(prm.partials[k.row * splits + s].softmax.lse(), target_here ? k.target_logit : -inf_f(),
                           k.lse_others, first_rule[s]);
  };
  // Calls f(row) for each kept row of this warp (every warps-th).
  const auto for_kept_rows = [&](auto&& f) {
    for (std::int64_t r = warp; r < rows; r += warps) {
      const std::int64_t row = first_row + r;
      const row_label lab = prm.labels(row);
      if (lab.kind == row_label::kept)
        f(kept_row{row, prm.labels.column(lab), prm.target_logit[row], prm.lse_others[row]});
    }
  };

  for (std::int64_t s0 = 0; s0 < splits; s0 += 32) {  // keys: the warps' maxima folded in (a max, in any order)
    const std::int64_t s = s0 + lane;
    float m = -inf_f();  // max_f keeps a NaN
    for_kept_rows([&](const kept_row& k) {
      if (s < splits) m = max_f(m, cost(k, s));
    });
    if (s < splits) atomic_max_float(key + s, m == m ? m : inf_f());
  }
  __syncthreads();
  reserved = reserved_shared;
  for (std::int64_t s = threadIdx.x; s < splits; s += Threads) {  // cheapest first, ties by index
    int k = 0;
    for (std::int64_t j = 0; j < splits; ++j) k += key[j] < key[s] || (key[j] == key[s] && j < s);
    order[k] = int(s);
    rank[s] = k;
    if (key[s] < inf_f()) atomicAdd(&finite_keys, 1);
  }
  __syncthreads();

  // The longest prefix of the finite keys' ranking within every kept row's budget: each row's costs added in rank
  // order, 32 ranks at a time (a scan across the lanes), up to the first rank its budget does not admit.
  const int finite = finite_keys;
  for_kept_rows([&](const kept_row& row) {
    float spent = prm.budget.tile_mass * float(reserved);
    int stop = finite;
    for (int k0 = 0; k0 < finite; k0 += 32) {
      const int k = k0 + lane;
      float c = k < finite ? cost(row, order[k]) : 0.f;
#pragma unroll
      for (int d = 1; d < 32; d *= 2) {
        const float u = __shfl_up_sync(all, c, d);
        if (lane >= d) c += u;
      }
      const unsigned fails = __ballot_sync(all, k < finite && !prm.budget.admits(spent + c));
      if (fails != 0) {
        stop = k0 + __ffs(int(fails)) - 1;
        break;
      }
      spent += __shfl_sync(all, c, 31);
    }
    if (lane == 0) atomicMin(&prefix_shared, stop);
  });
  __syncthreads();
  const int prefix = prefix_shared;
  for (std::int64_t s = threadIdx.x; s < splits; s += Threads) {
    const tile::split_span t = tile::split_col_tiles(g, splits, prm.split_cols, s);
    for (std::int64_t ct = t.begin; ct < t.end; ++ct) prm.skip[rt * g.col_tiles() + ct] = rank[s] < prefix;
  }
}

}  // namespace cce::detail
