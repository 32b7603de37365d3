// Backward, step 1 of each chunk: recompute a logit tile and turn it into draw = dz * dz/draw (row_loss.hpp),
// stored in T into the chunk buffer for the two gradient GEMMs. The gradient filter decides
// per tile, from the forward's tile max and the rows' non-target log-sum-exp, before anything is loaded; a skipped tile is marked
// inactive and the GEMMs never read it. Column sums of draw (the bias gradient) are written per row tile.
//
// With vocabulary sorting the columns are sorted positions, whose tiles the forward's maxima do not describe: the
// tile is recomputed and the same predicate is applied to its own max logit over the kept rows (`filter_in_tile`).
// The classifier rows, bias, weights and B rows are then the chunk's gathered copies, indexed by column - col_base.
#pragma once

#include <cstdint>

#include <cub/block/block_scan.cuh>

#include <cce/detail/element_type.hpp>
#include <cce/dispatch/plan.hpp>
#include <cce/epilogue/logit_terms.hpp>
#include <cce/epilogue/row_loss.hpp>
#include <cce/filter/predicates.hpp>
#include <cce/kernel/portable/fast_math.cuh>
#include <cce/kernel/portable/fragment_logits.cuh>
#include <cce/kernel/portable/mainloop.cuh>
#include <cce/kernel/portable/warp_reduce.cuh>
#include <cce/tile/tile_grid.hpp>

namespace cce::detail {

template <class T>
struct dlogit_params {
  operand<T> e;  // N x D
  operand<T> c;  // V x D (row j is column col_base + j)
  logit_terms<T> terms;                    // bias and B indexed by column - col_base
  const float* class_weights = nullptr;    // of the problem's classes, indexed by column - col_base
  const row_coefficients* coef = nullptr;  // N
  tile::tile_grid grid;                    // N x V
  const float* tile_max = nullptr;         // row_tiles x col_tiles, null when the filter is off
  const std::uint8_t* split_skip = nullptr;  // row_tiles x col_tiles (saved_buffers), with tile_max
  filter::mass_threshold filter{};
  bool filter_in_tile = false;             // decide from the recomputed tile (sorted columns), tile_max is null
  std::int64_t col_base = 0;               // first column the c, bias, B and weight pointers hold
  unsigned long long* tile_counts = nullptr;  // optional: tiles computed, tiles skipped
  std::int64_t row0 = 0, v0 = 0;           // origin of this (row block, chunk)
  std::int64_t chunk_cols = 0;             // leading dimension of dz, multiple of bn
  T* dz = nullptr;                         // rows x chunk_cols
  std::uint8_t* active = nullptr;          // (rows / bm) x (chunk_cols / bn), or the walk's flags (active_ld)
  std::int64_t active_ld = 0;              // row pitch of `active` in flags where not chunk_cols / bn
  float* dbias_partial = nullptr;          // row_tiles x chunk_cols (absolute row tile), or null
  // With one gradient filtered (tile_flags_kernel only): the filter's decision per tile, while `active` marks every
  // tile with gradient.
  std::uint8_t* significant = nullptr;
  // The compacted walk (plan.hpp, compact_walk_buffers): walk_flags_kernel gives each live tile a slot, if
  // slot_capacity > 0; the sm_90a kernel, given `slots` (of row pitch flag_pitch()), stores tile (rt, ct) of bm x bn
  // at dz + slots[rt][ct] bm bn, row-major, its rows past N as zeros (the products read whole slots).
  compact_walk_buffers compact{};
  std::int64_t slot_capacity = 0;
  std::int64_t sum_row_bytes = 0;  // a row of D in fp32 (the dE parts' sums)
  std::int64_t sum_rows = 0;       // fp32 rows of D the slots hold (plan::compact_sum_rows)
  const std::int32_t* slots = nullptr;
  // Runs only if *enabled != 0 (null: always): the chunk walk's launches, or the compacted walk's, as its state says.
  const int* enabled = nullptr;

  __host__ __device__ bool disabled() const { return enabled != nullptr && *enabled == 0; }
  __host__ __device__ std::int64_t flag_pitch() const { return active_ld > 0 ? active_ld : chunk_cols / grid.bn; }
};

// What a tile's rows say about it: whether any row carries gradient, whether a target lies in its columns, whether
// every row with gradient takes the near-uniform baseline, and the smallest non-target log-sum-exp of those rows
// (the filter's reference). Every thread gets the same answer.
struct tile_rows {
  bool kept = false;
  bool target = false;
  bool near_uniform = false;
  float min_floor = 0.f;
};

// `target` tells of classes [c0, c1).
template <int Threads>
__device__ __forceinline__ tile_rows tile_row_summary(const row_coefficients* coef, const tile::tile_grid& g,
                                                      std::int64_t rt, std::int64_t c0, std::int64_t c1) {
  constexpr int warps = Threads / 32;
  __shared__ float warp_min[warps];
  __shared__ int warp_flags[warps];
  float my_min = inf_f();
  int flags = 0;  // bit 0: a row carries gradient; bit 1: a target lies in the tile; bit 2: a row has no baseline
  for (std::int64_t r = threadIdx.x; r < g.rows_in(rt); r += Threads) {
    const row_coefficients& rc = coef[g.row_begin(rt) + r];
    if (!rc.kept) continue;
    flags |= 1;
    if (rc.target >= c0 && rc.target < c1) flags |= 2;
    if (rc.dz.baseline == 0.f) flags |= 4;
    my_min = min_f(my_min, rc.lse_others);
  }
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) {
    my_min = min_f(my_min, shuffle_xor(my_min, mask));
    flags |= __shfl_xor_sync(0xffffffffu, flags, mask);
  }
  if (threadIdx.x % 32 == 0) {
    warp_min[threadIdx.x / 32] = my_min;
    warp_flags[threadIdx.x / 32] = flags;
  }
  __syncthreads();
  float min_floor = warp_min[0];
  flags = warp_flags[0];
#pragma unroll
  for (int w = 1; w < warps; ++w) {
    min_floor = min_f(min_floor, warp_min[w]);
    flags |= warp_flags[w];
  }
  __syncthreads();  // the arrays may be rewritten by the next call
  return {(flags & 1) != 0, (flags & 2) != 0, (flags & 5) == 1, min_floor};
}
template <int Threads>
__device__ __forceinline__ tile_rows tile_row_summary(const row_coefficients* coef, const tile::tile_grid& g,
                                                      std::int64_t rt, std::int64_t ct) {
  return tile_row_summary<Threads>(coef, g, rt, g.col_begin(ct), g.col_begin(ct) + g.cols_in(ct));
}

// Does tile (rt, ct), whose rows say `t`, contribute? Rows that carry no gradient do not count; a tile holding a
// target is kept, and so is every tile when the filter is off; without a target, a tile whose rows all take the
// near-uniform baseline holds only their deviations from it and is skipped.
__device__ __forceinline__ bool tile_is_active(const tile_rows& t, const tile::tile_grid& g, std::int64_t rt,
                                               std::int64_t ct, const float* tile_max, const std::uint8_t* split_skip,
                                               const filter::mass_threshold& filter) {
  if (!t.kept) return false;
  if (t.target || tile_max == nullptr) return true;
  if (t.near_uniform) return false;
  // NaN in either operand makes the comparison false: the tile is kept.
  const std::int64_t tile = rt * g.col_tiles() + ct;
  return !filter.skip(tile_max[tile] - t.min_floor, split_skip != nullptr && split_skip[tile] != 0);
}
// The same from the rows themselves. Every thread returns the same answer.
template <int Threads>
__device__ __forceinline__ bool tile_is_active(const row_coefficients* coef, const tile::tile_grid& g, std::int64_t rt,
                                               std::int64_t ct, const float* tile_max, const std::uint8_t* split_skip,
                                               const filter::mass_threshold& filter) {
  return tile_is_active(tile_row_summary<Threads>(coef, g, rt, ct), g, rt, ct, tile_max, split_skip, filter);
}

// The flags of a (row block, chunk)'s tiles before any is computed, two filter tiles per CTA: for the sm_90a dlogit
// kernel, whose producer must not load a skipped tile, and with one gradient filtered, where the walk computes every
// tile with gradient (`active`) and the filter's decision goes to `significant` (and to the counts). Tiles not
// computed get their bias column sums (zero) here.
template <class T>
__global__ void __launch_bounds__(128) tile_flags_kernel(const __grid_constant__ dlogit_params<T> prm) {
  const tile::tile_grid& g = prm.grid;
  const std::int64_t filter_tiles = prm.chunk_cols / g.bn;
  for (int h = 0; h < 2; ++h) {
    const std::int64_t ft = 2 * std::int64_t(blockIdx.y) + h;       // filter tile in the chunk
    if (ft >= filter_tiles || prm.v0 + ft * g.bn >= g.cols) break;  // past the chunk or the vocabulary
    const std::int64_t rt = prm.row0 / g.bm + blockIdx.x, ct = prm.v0 / g.bn + ft;
    const tile_rows rows = tile_row_summary<128>(prm.coef, g, rt, ct);
    const bool significant = tile_is_active(rows, g, rt, ct, prm.tile_max, prm.split_skip, prm.filter);
    const bool computed = prm.significant ? tile_is_active(rows, g, rt, ct, nullptr, nullptr, prm.filter) : significant;
    if (!computed && prm.dbias_partial) {
      for (int c = threadIdx.x; c < g.bn; c += 128) prm.dbias_partial[rt * prm.chunk_cols + ft * g.bn + c] = 0.f;
    }
    if (threadIdx.x == 0) {
      prm.active[blockIdx.x * prm.flag_pitch() + ft] = computed;
      if (prm.significant) prm.significant[blockIdx.x * filter_tiles + ft] = significant;
      if (prm.tile_counts) atomicAdd(prm.tile_counts + (significant ? 0 : 1), 1ull);
    }
  }
}
inline dim3 tile_flags_grid(std::int64_t rows, std::int64_t chunk_cols, const tile::tile_grid& g) {
  return dim3(unsigned(ceil_div(rows, g.bm)), unsigned(ceil_div(chunk_cols, 2 * g.bn)));
}

// The compacted walk's dE parts (plan.hpp), by the CTA of the last row tile to be ranked, whose `total` live tiles
// fit: row tile rt in ceil(live / compact_part_tiles) parts where the parts' fp32 sums fit the free slots, else every
// row tile in one part. Two block scans over runs of row tiles: the parts' sums, then the parts and their sums' rows.
template <int Threads, class T>
__device__ void plan_compact_parts(const dlogit_params<T>& prm, int total) {
  using scan = cub::BlockScan<int, Threads>;
  __shared__ typename scan::TempStorage storage;
  const compact_walk_buffers& c = prm.compact;
  const int rows = int(gridDim.x), run = (rows + Threads - 1) / Threads;
  const int begin = int(threadIdx.x) * run, end = begin + run < rows ? begin + run : rows;
  const auto parts_of = [&](int rt) {
    const int live = __ldcg(c.row_live + rt);
    return live > compact_part_tiles ? int(ceil_div(std::int64_t(live), compact_part_tiles)) : 1;
  };
  int sums = 0;
  for (int rt = begin; rt < end; ++rt) {
    const int n = parts_of(rt);
    sums += n > 1 ? n : 0;
  }
  int sums_before = 0, all_sums = 0;
  scan(storage).ExclusiveSum(sums, sums_before, all_sums);
  // The sums start at the first whole fp32 row of D past the live slots.
  const std::int64_t slot_bytes = std::int64_t(sizeof(T)) * prm.grid.bm * prm.grid.bn;
  const std::int64_t base = ceil_div(std::int64_t(total) * slot_bytes, prm.sum_row_bytes);
  const bool split = base + std::int64_t(all_sums) * compact_part_rows <= prm.sum_rows;
  int parts = 0;
  for (int rt = begin; rt < end; ++rt) parts += split ? parts_of(rt) : 1;
  int part = 0, all_parts = 0;
  __syncthreads();  // the scan's storage is reused
  scan(storage).ExclusiveSum(parts, part, all_parts);
  int sum = sums_before;
  for (int rt = begin; rt < end; ++rt) {
    const int n = split ? parts_of(rt) : 1;
    c.row_sums[rt] = n > 1 ? sum : -1;
    sum += n > 1 ? n : 0;
    for (int p = 0; p < n; ++p) c.parts[part++] = compact_part{rt, p};
  }
  if (threadIdx.x == 0) {
    c.state[5] = all_parts;
    c.state[6] = int(base);
  }
}

// The flags of every tile of the walk in one launch (plan::walk_flags), a CTA per row tile: the rows' summary once,
// the filter's decision for each class tile, then the target tile of each row with gradient marked (a tile holding
// a target is kept), and the counts. tile_flags_kernel summarises the rows anew for every pair of class tiles, and
// its launches, one per chunk and row block, took 6 us each on gpt2 (18 a step). `active` is the row tile's first
// flag of row pitch active_ld; tile_max, split_skip, filter and tile_counts as tile_flags_kernel reads them. With a
// slot capacity, the live tiles' slots of the compacted walk (compact: zeros in its state at launch).
template <class T>
__global__ void __launch_bounds__(128) walk_flags_kernel(const __grid_constant__ dlogit_params<T> prm) {
  const tile::tile_grid& g = prm.grid;
  const std::int64_t rt = blockIdx.x, col_tiles = g.col_tiles();
  std::uint8_t* flags = prm.active + rt * prm.active_ld;
  const tile_rows rows = tile_row_summary<128>(prm.coef, g, rt, 0, 0);  // no class range: the targets come next
  for (std::int64_t ct = threadIdx.x; ct < col_tiles; ct += 128)
    flags[ct] = tile_is_active(rows, g, rt, ct, prm.tile_max, prm.split_skip, prm.filter);
  __syncthreads();
  for (std::int64_t r = threadIdx.x; r < g.rows_in(rt); r += 128) {
    const row_coefficients& rc = prm.coef[g.row_begin(rt) + r];
    if (rc.kept && rc.target >= 0 && rc.target < g.cols) flags[rc.target / g.bn] = 1;
  }
  if (prm.tile_counts == nullptr && prm.slot_capacity == 0) return;
  __syncthreads();  // the marks above are seen by the whole CTA
  // The row's live tiles ranked in column order: each thread counts a contiguous run of the row, a block scan
  // joins them.
  using scan = cub::BlockScan<int, 128>;
  __shared__ typename scan::TempStorage storage;
  __shared__ int first_slot;
  const std::int64_t run = ceil_div(col_tiles, std::int64_t(128));
  const std::int64_t begin = threadIdx.x * run, end = begin + run < col_tiles ? begin + run : col_tiles;
  int count = 0;
  for (std::int64_t ct = begin; ct < end; ++ct) count += flags[ct];
  int rank = 0, live = 0;
  scan(storage).ExclusiveSum(count, rank, live);
  if (threadIdx.x == 0) {
    if (prm.tile_counts) {
      atomicAdd(prm.tile_counts, static_cast<unsigned long long>(live));
      atomicAdd(prm.tile_counts + 1, static_cast<unsigned long long>(col_tiles - live));
    }
    // Row tiles take their slots in whichever order they come: a tile's values do not depend on where it is kept.
    if (prm.slot_capacity > 0) first_slot = atomicAdd(prm.compact.state, live);
  }
  if (prm.slot_capacity == 0) return;
  __syncthreads();
  const compact_walk_buffers& c = prm.compact;
  std::int32_t* slots = c.slot + rt * prm.active_ld;
  for (std::int64_t ct = begin; ct < end; ++ct) {
    if (!flags[ct]) {
      slots[ct] = -1;
      continue;
    }
    slots[ct] = first_slot + rank;
    c.slot_tile[first_slot + rank++] = std::int32_t(ct);
  }
  __shared__ bool last;
  if (threadIdx.x == 0) {
    c.row_first[rt] = first_slot;
    c.row_live[rt] = live;
    __threadfence();
    last = atomicAdd(c.state + 1, 1) == int(gridDim.x) - 1;
  }
  __syncthreads();
  // The last row tile to finish knows whether the live tiles fit: it turns on the compacted walk or the chunk walk,
  // and lays out the dE parts.
  if (!last) return;
  __threadfence();
  const int total = atomicAdd(c.state, 0);
  const bool fits = total <= prm.slot_capacity;
  if (threadIdx.x == 0) {
    c.state[2] = fits ? 1 : 0;
    c.state[3] = fits ? 0 : 1;
  }
  if (fits) plan_compact_parts<128>(prm, total);
}

// The block-wide max of one value per thread (NaN wins). Every thread gets it.
template <int Threads>
__device__ __forceinline__ float block_max(float x) {
  constexpr int warps = Threads / 32;
  __shared__ float warp_max[warps];
  x = warp_max_all(x);
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = x;
  __syncthreads();
  x = warp_max[0];
#pragma unroll
  for (int w = 1; w < warps; ++w) x = max_f(x, warp_max[w]);
  __syncthreads();
  return x;
}

// Stores a thread's draw values of one row slot at their tile columns: column pairs as one 32-bit store where the
// layout holds adjacent pairs (the tensor-core fragments), one by one otherwise.
template <class T, class Layout>
__device__ __forceinline__ void store_row(T* out, const Layout& f, const float (&draw)[Layout::cols]) {
  if constexpr (Layout::paired_cols && sizeof(T) == 2) {
#pragma unroll
    for (int c = 0; c < Layout::cols; c += 2) {
      const T pair[2] = {from_float<T>(draw[c]), from_float<T>(draw[c + 1])};
      *reinterpret_cast<std::uint32_t*>(out + f.col(c)) = *reinterpret_cast<const std::uint32_t*>(pair);
    }
  } else {
#pragma unroll
    for (int c = 0; c < Layout::cols; ++c) out[f.col(c)] = from_float<T>(draw[c]);
  }
}

template <class T, class Policy, bool Vectorized>
__global__ void __launch_bounds__(Policy::threads, Policy::min_blocks) dlogit_kernel(const __grid_constant__ dlogit_params<T> prm) {
  using mainloop = mainloop_for<T, Policy, major::k, major::k>;
  using layout = typename mainloop::fragment_layout;
  extern __shared__ __align__(16) unsigned char smem[];
  if (prm.disabled()) return;

  const tile::tile_grid& g = prm.grid;
  const std::int64_t rt = prm.row0 / g.bm + blockIdx.x;  // absolute tile indices
  const std::int64_t ct = prm.v0 / g.bn + blockIdx.y;
  const std::int64_t row0 = g.row_begin(rt), col0 = g.col_begin(ct);
  float* dbias = prm.dbias_partial ? prm.dbias_partial + rt * prm.chunk_cols + (col0 - prm.v0) : nullptr;
  const layout f;
  typename mainloop::accumulators acc;
  const int limit = int(g.cols - col0 < Policy::bn ? g.cols - col0 : Policy::bn);  // local columns in range
  auto compute_logits = [&] {
    mainloop::clear(acc);
    mainloop::template run<Vectorized>(acc, smem, prm.e, row0, prm.c, col0 - prm.col_base, 0, prm.e.depth);
    fragment_logits(acc, f, prm.terms, row0, col0, g.rows, limit, prm.col_base);
  };
  bool active, computed = false;
  if (!prm.filter_in_tile) {
    active = tile_is_active<Policy::threads>(prm.coef, g, rt, ct, prm.tile_max, prm.split_skip, prm.filter);
  } else {
    // Sorted columns: recompute the tile, then the predicate on its max logit over the kept rows.
    const tile_rows t = tile_row_summary<Policy::threads>(prm.coef, g, rt, ct);
    active = t.kept;
    if (t.kept && !t.target) {
      compute_logits();
      computed = true;
      float m = -inf_f();
#pragma unroll
      for (int s = 0; s < layout::row_slots; ++s) {
        const std::int64_t row = row0 + f.row(s);
        if (row >= g.rows || !prm.coef[row].kept) continue;
#pragma unroll
        for (int c = 0; c < layout::cols; ++c)
          if (f.col(c) < limit) m = max_f(m, layout::at(acc, s, c));
      }
      // NaN in either operand makes the comparison false: the tile is kept.
      active = !prm.filter.skip(block_max<Policy::threads>(m) - t.min_floor);
    }
  }
  if (threadIdx.x == 0) {
    prm.active[blockIdx.x * prm.flag_pitch() + blockIdx.y] = active;
    if (prm.tile_counts) atomicAdd(prm.tile_counts + (active ? 0 : 1), 1ull);
  }
  if (!active) {
    if (dbias)
      for (int c = threadIdx.x; c < Policy::bn; c += Policy::threads) dbias[c] = 0.f;
    return;
  }

  if (!computed) compute_logits();
  const logit_derivative derivative(prm.terms.transform);
  const float* weights = prm.class_weights ? prm.class_weights + (col0 - prm.col_base) : nullptr;
  float col_sum[layout::cols];
#pragma unroll
  for (int c = 0; c < layout::cols; ++c) col_sum[c] = 0.f;
#pragma unroll
  for (int s = 0; s < layout::row_slots; ++s) {
    const std::int64_t row = row0 + f.row(s);
    if (row >= g.rows) continue;
    const row_coefficients rc = prm.coef[row];
    const std::int64_t to_target = rc.target - col0;
    const int target = to_target >= 0 && to_target < Policy::bn ? int(to_target) : -1;  // local column
    float draw[layout::cols];
#pragma unroll
    for (int c = 0; c < layout::cols; ++c) {
      const float z = layout::at(acc, s, c);
      const float p = exp2_approx((z - rc.lse) * log2e);  // exactly 1 at z = lse
      const float w = weights && f.col(c) < limit ? weights[f.col(c)] : 1.f;
      const float d = rc.dz.draw(p, f.col(c) == target, w, derivative(z), derivative.inv_temperature, z);
      draw[c] = rc.kept && f.col(c) < limit ? d : 0.f;  // past V inside the tile: 0 (the GEMMs read whole tiles)
      col_sum[c] += draw[c];
    }
    T* out = prm.dz + (row - prm.row0) * prm.chunk_cols + (col0 - prm.v0);
    store_row(out, f, draw);
  }

  if (dbias) {
    // Column sums: lanes sharing a column, then the warps along M, in a fixed order.
    auto* staged = reinterpret_cast<float*>(smem);  // bn x col_groups
#pragma unroll
    for (int c = 0; c < layout::cols; ++c) {
      float v = col_sum[c];
#pragma unroll
      for (int i = 0; i < layout::col_shuffle_count; ++i) v += shuffle_xor(v, layout::col_shuffle_first << i);
      if (f.col_leader()) staged[f.col(c) * layout::col_groups + f.col_group()] = v;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < Policy::bn; c += Policy::threads) {
      float v = 0.f;
      for (int k = 0; k < layout::col_groups; ++k) v += staged[c * layout::col_groups + k];
      dbias[c] = v;
    }
  }
}

}  // namespace cce::detail
