// Hopper backward step 1 (sm_90a): the contract of the portable dlogit kernel (kernel/portable/dlogit.cuh) on the
// logit-tile engine of logit_tile.cuh. The gradient filter's flags come first, from a small kernel, so that the
// producer never loads a skipped tile; persistent CTAs then share the live (128-row, 256-class) tiles evenly,
// recompute the logits and store draw = dz * dz/draw in T into the chunk buffer, with the bias gradient's column sums.
// A 256-class tile spans two 128-class filter tiles: it is computed when either is active, and only the active
// halves are stored (the gradient GEMMs read only those). In the compacted walk (plan.hpp) one launch takes the
// live tiles of all rows and classes, each half stored at its slot.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cub/block/block_scan.cuh>

#include <cce/detail/element_type.hpp>
#include <cce/kernel/portable/dlogit.cuh>
#include <cce/kernel/sm90/logit_tile.cuh>
#include <cce/tile/tile_grid.hpp>

namespace cce::detail::sm90 {

template <class T>
struct dlogit_params_sm90 {
  operand_maps maps;
  dlogit_params<T> base;
  std::int64_t rows = 0;  // rows of this row block
  std::int64_t cols = 0;  // classes of this chunk
};

// Tiles a dlogit CTA can take (dispatch/sm90.cuh falls back to the portable kernel past it).
inline constexpr int dlogit_tiles_per_cta = 2048;

// One row slot's constants for a tile's epilogue (a thread holds 2 rows x 64 columns, wgmma.cuh). Column offsets
// are relative to the thread's first column, so that the per-logit tests compare with compile-time constants.
struct dlogit_row {
  row_coefficients rc;
  int limit = 0;    // logits [0, limit) of the slot carry gradient: 0 for a row without one, less at the vocab's end
  int target = -1;  // offset of the target among the slot's columns, -1 when it is not there
};

// The order in which a (row block, chunk)'s tiles are ranked: tile::grouped_order over groups of
// logit_tile_shape::l2_row_group row tiles, column-major within a group. 32-bit: a launch has at most
// dlogit_tiles_per_cta tiles per CTA.
struct tile_order {
  int row_tiles = 0, wide_tiles = 0, group = 0;

  __device__ tile_order(std::int64_t rows, std::int64_t cols, std::int64_t depth, int elem_bytes)
      : row_tiles(int(ceil_div(rows, std::int64_t(logit_tile_shape::bm)))),
        wide_tiles(int(ceil_div(cols, std::int64_t(logit_tile_shape::bn)))),
        group(logit_tile_shape::l2_row_group(depth, elem_bytes)) {}
  __device__ int tiles() const { return row_tiles * wide_tiles; }
  // Tile t of the order as (row tile, wide tile) in the block.
  __device__ void at(int t, std::int64_t& rl, std::int64_t& wt) const {
    const tile::grouped_order pos(t, row_tiles, wide_tiles, group);
    rl = pos.m;
    wt = pos.n;
  }
};

// This CTA's share of the live tiles among `tiles` (live(t) says which): their ranks r with r % gridDim.x ==
// blockIdx.x, in rank order, into `mine`; returns how many. Every thread ranks a contiguous run, a block scan joins
// them.
template <int Threads, class Live>
__device__ int rank_live_tiles(std::int32_t* mine, int tiles, const Live& live) {
  using scan = cub::BlockScan<int, Threads>;
  __shared__ typename scan::TempStorage scan_storage;
  const int run = (tiles + Threads - 1) / Threads;
  const int begin = int(threadIdx.x) * run, end = begin + run < tiles ? begin + run : tiles;
  int count = 0;
  for (int t = begin; t < end; ++t) count += live(t) ? 1 : 0;
  int rank = 0, total = 0;
  scan(scan_storage).ExclusiveSum(count, rank, total);
  for (int t = begin; t < end; ++t) {
    if (!live(t)) continue;
    if (rank % int(gridDim.x) == int(blockIdx.x)) mine[rank / int(gridDim.x)] = t;
    ++rank;
  }
  __syncthreads();
  return total > int(blockIdx.x) ? (total - int(blockIdx.x) + int(gridDim.x) - 1) / int(gridDim.x) : 0;
}

// Persistent: the grid's CTAs (at most one per SM) rank the live (row tile, 256-class tile) pairs in tile_order and
// take every gridDim.x-th from their own index, so that the CTAs running at once share their operands in L2 and each
// gets its share of live tiles whatever their pattern (taking every gridDim.x-th tile and skipping the dead ones left
// each CTA a random count of live ones, and a launch lasts as long as its busiest CTA).
template <class T>
__global__ void __launch_bounds__(logit_tile_shape::threads, 1)
    dlogit_kernel(const __grid_constant__ dlogit_params_sm90<T> prm) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using S = logit_tile_shape;
  // Only the sm_90a image has this body (and static shared memory: the host checks for it, dispatch/sm90.cuh).
  extern __shared__ unsigned char smem_raw[];
  __shared__ stage_barriers<S::stages> bars;
  __shared__ float col_sums[S::consumer_warps][S::bn];

  const dlogit_params<T>& p = prm.base;
  if (p.disabled()) return;
  const tile::tile_grid& g = p.grid;
  const std::int64_t flag_pitch = p.flag_pitch();
  const std::int64_t filter_tiles = ceil_div(prm.cols, S::filter_bn);
  const tile_order order(prm.rows, prm.cols, p.e.depth, int(sizeof(T)));
  // Whether half h (a 128-class filter tile) of wide tile wt of row tile rl (in the block) is computed.
  auto half_active = [&](std::int64_t rl, std::int64_t wt, int h) {
    const std::int64_t ft = 2 * wt + h;
    return ft < filter_tiles && p.active[rl * flag_pitch + ft] != 0;
  };
  __shared__ std::int32_t my_tiles[dlogit_tiles_per_cta];
  const int tiles = rank_live_tiles<S::threads>(my_tiles, order.tiles(), [&](int t) {
    std::int64_t rl, wt;
    order.at(t, rl, wt);
    return half_active(rl, wt, 0) || half_active(rl, wt, 1);
  });
  const int k_blocks = int(ceil_div(p.e.depth, S::bk));

  if (threadIdx.x == 0) bars.init(S::consumer_warps);
  __syncthreads();
  const tile_ring<T> ring(smem_raw, bars);

  if (threadIdx.x / 128 == 0) {  // producer
    shrink_registers<S::producer_registers>();
    if (threadIdx.x == 0) {
      ring_position<S::stages> at;
      for (int i = 0; i < tiles; ++i) {
        std::int64_t rl, wt;
        order.at(my_tiles[i], rl, wt);
        ring.load_tile(at, &prm.maps, int(p.row0 + rl * S::bm), int(p.v0 + wt * S::bn), k_blocks);
      }
    }
    return;
  }

  grow_registers<S::consumer_registers>();
  const int cw = threadIdx.x / 32 - 4;  // consumer warp
  const int lane = threadIdx.x % 32, lane_row = lane / 4, lane_col = 2 * (lane % 4);
  const int local_row = (cw / 4) * 64 + (cw % 4) * 16 + lane_row;  // row slot r adds 8 r
  const logit_derivative derivative(p.terms.transform);
  const bool bias_sums = p.dbias_partial != nullptr, weighted = p.class_weights != nullptr;

  float acc[128];
  ring_position<S::stages> at;
  for (int i = 0; i < tiles; ++i) {
    std::int64_t rl, wt;
    order.at(my_tiles[i], rl, wt);
    const bool active[2] = {half_active(rl, wt, 0), half_active(rl, wt, 1)};  // at least one
    const std::int64_t row0 = p.row0 + rl * S::bm, col0 = p.v0 + wt * S::bn;
    const std::int64_t col_thread = col0 + lane_col;
    // The rows' constants are loaded before the products, so that the epilogue does not wait for them.
    dlogit_row slot[2];
    // Where the thread's first column of each row slot is stored (null past the block's rows: nothing is), and how
    // far half 1's stores lie from where they would follow half 0's: 0 in the chunk's block; in the compacted walk
    // each half is a slot of its own, whose rows past N are stored too (as zeros: no row coefficients).
    T* out[2] = {nullptr, nullptr};
    constexpr std::int64_t slot_size = std::int64_t(S::bm) * S::filter_bn;
    std::int64_t half_step = 0;
    std::int64_t first_slot = -1;
    if (p.slots != nullptr) {
      const std::int32_t* slots = p.slots + rl * flag_pitch + 2 * wt;
      first_slot = active[0] ? slots[0] : slots[1];
      // (half 1 alone starts at its slot)
      half_step = (active[0] && active[1] ? (slots[1] - first_slot) * slot_size : 0) - S::filter_bn;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const std::int64_t row = row0 + local_row + 8 * r;
      const bool in_block = row < g.rows && row - p.row0 < prm.rows;
      if (first_slot >= 0)
        out[r] = p.dz + first_slot * slot_size + (local_row + 8 * r) * S::filter_bn + lane_col;
      else if (in_block)
        out[r] = p.dz + (row - p.row0) * p.chunk_cols + (col_thread - p.v0);
      if (in_block) slot[r].rc = p.coef[row];
    }
    ring.compute_tile(acc, at, k_blocks, cw / 4);
    if (p.terms.has_raw_terms()) add_raw_terms(acc, p.terms, row0 + local_row, col_thread, g);
    transform_logits(acc, p.terms.transform);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (out[r] == nullptr || !slot[r].rc.kept) continue;
      const std::int64_t left = g.cols - col_thread, to_target = slot[r].rc.target - col_thread;
      slot[r].limit = int(left < 0 ? 0 : left < S::bn ? left : S::bn);
      slot[r].target = to_target >= 0 && to_target < S::bn ? int(to_target) : -1;
    }

    const float* weights = weighted ? p.class_weights + col_thread : nullptr;

    // emit(value): draw of the active halves, value(r, c, z) at column c (from the thread's first) of row slot r,
    // stored in T (columns past V inside an active filter tile as 0: the GEMMs read whole tiles); with a bias, its
    // column sums over the CTA's rows go to col_sums (inactive halves sum to 0). Stores go in 8-byte runs
    // (paired_runs).
    const paired_runs runs(lane);
    const int run_offset = runs.first - lane_col;  // from the thread's first column
    const auto emit = [&](const auto& value) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // The half's draws replace its logits, 8 columns at a time, each group packed and stored as soon as it is
        // drawn: one block of work with no branch in it (a branch per group cut the epilogue into short dependent
        // runs, docs/performance.md); drawing the whole half before any store spilled registers.
        if (!active[h]) continue;
#pragma unroll
        for (int b = 8 * h; b < 8 * h + 8; ++b) {
#pragma unroll
          for (int j = 2 * b; j < 2 * b + 2; ++j)
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
              for (int e = 0; e < 2; ++e) acc[4 * j + 2 * r + e] = value(r, 8 * j + e, acc[4 * j + 2 * r + e]);
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const auto pack = [&](int j) {
              const T pair[2] = {from_float<T>(acc[4 * j + 2 * r]), from_float<T>(acc[4 * j + 2 * r + 1])};
              return *reinterpret_cast<const std::uint32_t*>(pair);
            };
            const uint2 four = runs.trade(pack(2 * b), pack(2 * b + 1));
            if (out[r] != nullptr) *reinterpret_cast<uint2*>(out[r] + (h ? half_step : 0) + run_offset + 16 * b) = four;
          }
        }
      }
      if (bias_sums) {
#pragma unroll
        for (int j = 0; j < 32; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float v = active[j / 16] ? acc[4 * j + e] + acc[4 * j + 2 + e] : 0.f;
#pragma unroll
            for (int mask = 4; mask < 32; mask *= 2) v += shuffle_xor(v, mask);
            if (lane_row == 0) col_sums[cw][8 * j + lane_col + e] = v;
          }
      }
    };
    // The common tile of a warp: its 16 rows have gradient, every class is inside the vocabulary, no class weights.
    // Then draw = (a p + b) f(z) + c with a softcap (f its factor), a p + b without, with the row's a, b and c
    // (dlogit_coefficients::non_target, 1/T in them), and + l z where a row of the warp is near-uniform to first
    // order: a few instructions per logit where the general form below takes about 28. With the 8-byte stores it
    // shortens the epilogue, which no product overlaps; either alone did not (docs/performance.md). A target among
    // the warp's columns (`targeted`, not with l) takes the general form's draw, worked out once per row slot from
    // its logit and selected at its column, rather than the general form for all 128 logits (1,500 instructions of
    // code against 4,400, which a CTA with few tiles fetches cold).
    const auto general_value = [&](int r, int c, float z) {
      const float prob = exp2_approx((z - slot[r].rc.lse) * log2e);  // exactly 1 at z = lse
      const float w = weighted && c < slot[r].limit ? weights[c] : 1.f;
      const float d = slot[r].rc.dz.draw(prob, c == slot[r].target, w, derivative(z), derivative.inv_temperature, z);
      return c < slot[r].limit ? d : 0.f;
    };
    const bool plain = __all_sync(0xffffffffu, !weighted && out[0] != nullptr && out[1] != nullptr &&
                                                   slot[0].limit == S::bn && slot[1].limit == S::bn);
    const bool targeted = plain && __any_sync(0xffffffffu, slot[0].target >= 0 || slot[1].target >= 0);
    const auto plain_value = [&](auto capped_constant, auto linear_constant, auto targeted_constant) {
      constexpr bool capped = decltype(capped_constant)::value, linear = decltype(linear_constant)::value;
      constexpr bool with_target = decltype(targeted_constant)::value;
      const dlogit_coefficients::affine af[2] = {slot[0].rc.dz.non_target(derivative.inv_temperature, capped),
                                                 slot[1].rc.dz.non_target(derivative.inv_temperature, capped)};
      // p = 2^(z log2(e) - lse log2(e)) in one FMA: its rounding (a few 2^-24 of |z| + |lse|, relative) is far below
      // a 16-bit draw's, the only kind this kernel stores.
      const float shift[2] = {slot[0].rc.lse * log2e, slot[1].rc.lse * log2e};
      float at_target[2] = {0.f, 0.f};
      if constexpr (with_target) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float z = 0.f;
#pragma unroll
          for (int j = 0; j < 32; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) z = 8 * j + e == slot[r].target ? acc[4 * j + 2 * r + e] : z;
          at_target[r] = general_value(r, slot[r].target, z);
        }
      }
      return [&, af, shift, at_target](int r, int c, float z) {
        float d = fmaf(af[r].a, exp2_approx(fmaf(z, log2e, -shift[r])), af[r].b);
        if constexpr (capped) d = fmaf(d, derivative.softcap_factor(z), af[r].c);
        if constexpr (linear) d = fmaf(af[r].l, z, d);
        if constexpr (with_target) d = c == slot[r].target ? at_target[r] : d;
        return d;
      };
    };
    const bool linear = plain && __any_sync(0xffffffffu, slot[0].rc.dz.slope != 0.f || slot[1].rc.dz.slope != 0.f);
    const bool capped = p.terms.transform.softcap > 0.f;
    using yes = std::true_type;
    using no = std::false_type;
    if (plain && !targeted) {
      if (capped && linear)
        emit(plain_value(yes{}, yes{}, no{}));
      else if (capped)
        emit(plain_value(yes{}, no{}, no{}));
      else if (linear)
        emit(plain_value(no{}, yes{}, no{}));
      else
        emit(plain_value(no{}, no{}, no{}));
    } else if (plain && !linear) {
      if (capped)
        emit(plain_value(yes{}, no{}, yes{}));
      else
        emit(plain_value(no{}, no{}, yes{}));
    } else {
      emit(general_value);
    }

    if (bias_sums) {  // the warps' column sums, in a fixed order
      consumer_barrier();
      const int c = threadIdx.x - 128;
      if (2 * wt + c / S::filter_bn < filter_tiles) {
        float v = 0.f;
        for (int w = 0; w < S::consumer_warps; ++w) v += col_sums[w][c];
        p.dbias_partial[(row0 / S::bm) * p.chunk_cols + (col0 - p.v0) + c] = v;
      }
      consumer_barrier();  // col_sums is rewritten by the next tile
    }
  }
#endif
}

}  // namespace cce::detail::sm90
