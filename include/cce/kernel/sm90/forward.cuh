// Hopper forward kernel (sm_90a): the contract of the portable forward (kernel/portable/forward.cuh: per-(row, split)
// softmax partials, the target logit, the per-tile max for the gradient filter) on the logit-tile engine of
// logit_tile.cuh. A unit of work is the run of 256-class tiles of one vocab split for 128 rows; each CTA walks one or
// more units, and while the producer runs ahead into the next tile, the consumers fold the finished one into
// online-softmax statistics.
//
// A thread owns 2 rows x 64 columns of each tile (wgmma.cuh) and keeps its own statistics for its two rows across the
// run; the four lanes of a row merge theirs once, at the end.
//
// The CTAs of neighbouring row tiles walk the class tiles in clusters of two that share each C stage, so that the
// classifier crosses L2 once per 256 rows instead of once per 128: where the row tiles pair up, or with runs of class
// tiles long enough to pay for padding the grid's rows to whole clusters (a padding CTA computes but stores nothing).
#pragma once

#include <cstdint>

#include <cce/detail/math.hpp>
#include <cce/epilogue/row_partial.hpp>
#include <cce/kernel/portable/forward.cuh>
#include <cce/kernel/portable/warp_reduce.cuh>
#include <cce/kernel/sm90/forward_units.hpp>
#include <cce/kernel/sm90/logit_tile.cuh>
#include <cce/tile/tile_grid.hpp>

namespace cce::detail::sm90 {

using forward_shape = logit_tile_shape;
static_assert(forward_shape::bm == forward_unit_shape::rows && forward_shape::bn == forward_unit_shape::classes &&
                  forward_shape::bk == forward_unit_shape::depth,
              "the units the host plans are the kernel's");
template <class T>
using forward_ring = tile_ring<T, major::k, major::k, forward_cluster>;

// *addr = max(*addr, v) for an address that holds a float or the bits 0xFFFFFFFF (launch_forward presets them),
// which both comparisons below rank under every float: non-negative floats order as signed integers, negative ones
// (sign bit set, -0 included) in reverse as unsigned ones. A max: the result is the same in any order.
__device__ __forceinline__ void atomic_max_float(float* addr, float v) {
  if (!signbit(v))
    atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
  else
    atomicMin(reinterpret_cast<unsigned*>(addr), __float_as_uint(v));
}

// Where loss_and_grad's logit-keeping forward (dispatch/plan.hpp) writes each tile: per row, z - ref in fp16 at
// logits[row * ld + col], with ref the row's max over the 256-class tile at ref[row * ref_ld + tile]. fp16 holds
// d = z - ref to 2^-11 of |d|, so p = exp(z - lse) formed from it is off by |d| 2^-11 relatively: less than the bf16
// rounding of the dZ it becomes (2^-9) wherever p is within e^-4 of the tile's largest, and more only on values that
// weigh less in every sum.
struct kept_logits {
  __half* logits = nullptr;
  std::int64_t ld = 0;  // a multiple of 4
  float* ref = nullptr;
  std::int64_t ref_ld = 0;
};

template <class T>
struct forward_params_sm90 {
  operand_maps maps;
  forward_params<T> base;
  bool share_classifier = false;  // the grid runs in clusters of forward_cluster CTAs sharing C stages
  kept_logits kept{};             // KeepLogits kernels only
};

// Capped: softcapped logits fold against the cap rather than each tile's row max (capped_softmax), held as ratios r
// until they are needed as logits. A kernel of its own: a run-time branch between the two forms slowed both
// (docs/performance.md).
template <class T, bool KeepLogits = false, bool Capped = false>
__global__ void __launch_bounds__(forward_shape::threads, 1)
    forward_kernel(const __grid_constant__ forward_params_sm90<T> prm) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using S = forward_shape;
  // Only the sm_90a image has this body (and static shared memory: the host checks for it, sm90.cuh).
  extern __shared__ unsigned char smem_raw[];
  __shared__ stage_barriers<S::stages> bars;
  __shared__ std::int32_t unit_targets[2][S::bm];  // by the parity of the CTA's unit

  const forward_ring<T> ring(smem_raw, bars, prm.share_classifier);

  const forward_params<T>& p = prm.base;
  const tile::tile_grid& g = p.grid;
  // The work comes in units of one (row tile, split), taken by clusters in tile::grouped_order over groups of
  // l2_row_group row tiles (in whole clusters), so that the units running at once share their E and C tiles in L2;
  // the CTAs of a cluster take one split of neighbouring row tiles. A CTA (cluster) walks units c, c + G, ... of the
  // G it launches with, the producer running on into the next unit's tiles while the consumers finish the last.
  const int cluster = prm.share_classifier ? forward_cluster : 1;
  const int clusters_x = int(ceil_div(g.row_tiles(), std::int64_t(cluster)));
  const int units = clusters_x * int(p.splits), stride = int(gridDim.x) / cluster;
  const int group = S::l2_row_group(p.e.depth, int(sizeof(T))) / cluster;
  struct unit {
    int rt, split, ct_begin, ct_end;  // row tile, vocab split and its 256-class tiles
  };
  const auto unit_at = [&](int u) {
    const tile::grouped_order pos(u, clusters_x, int(p.splits), group);
    const std::int64_t wide_tiles = ceil_div(g.cols, S::bn);
    return unit{pos.m * cluster + int(blockIdx.x) % cluster, pos.n, int(tile::split_begin(wide_tiles, p.splits, pos.n)),
                int(tile::split_begin(wide_tiles, p.splits, pos.n + 1))};
  };
  const int first = int(blockIdx.x) / cluster;
  const int k_blocks = int(ceil_div(p.e.depth, S::bk));

  if (threadIdx.x == 0) bars.init(ring.stage_readers());
  cluster_sync();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {  // producer
    shrink_registers<S::producer_registers>();
    if (threadIdx.x == 0) {
      ring_position<S::stages> at;
      for (int u = first; u < units; u += stride) {
        const unit w = unit_at(u);
        for (std::int64_t ct = w.ct_begin; ct < w.ct_end; ++ct)
          ring.load_tile(at, &prm.maps, w.rt * S::bm, int(ct * S::bn), k_blocks);
      }
      ring.drain(at);
    }
    return;
  }

  grow_registers<S::consumer_registers>();
  const int cw = threadIdx.x / 32 - 4;  // consumer warp
  const int lane = threadIdx.x % 32, lane_row = lane / 4, lane_col = 2 * (lane % 4);
  const int local_row = (cw / 4) * 64 + (cw % 4) * 16 + lane_row;  // row slot r adds 8 r

  static_assert(!(KeepLogits && Capped), "kept logits are stored against each tile's max");
  const capped_softmax cs(p.terms.transform);
  const auto logit = [&](float v) {
    if constexpr (Capped)
      return cs.cap.logit(v);
    else
      return v;
  };

  ring_position<S::stages> at;
  for (int u = first, parity = 0; u < units; u += stride, parity ^= 1) {
    const unit w = unit_at(u);
    const std::int64_t rt = w.rt, split = w.split, row0 = rt * S::bm;
    // The unit's targets, visible to every consumer after the barrier; the buffer of the other parity may still be
    // read by the previous unit's epilogue, this one's was last read two units ago, before the previous barrier.
    std::int32_t* targets = unit_targets[parity];
    for (int r = int(threadIdx.x) - 128; r < S::bm; r += 128 * S::consumers) {
      const std::int64_t row = row0 + r;
      targets[r] = row < g.rows ? p.labels.column(p.labels(row)) : -1;
    }
    consumer_barrier();

    float acc[128];
    row_partial part[2];
    for (std::int64_t ct = w.ct_begin; ct < w.ct_end; ++ct) {
      ring.compute_tile(acc, at, k_blocks, cw / 4);

      // Epilogue: logits z in place, then the tile's statistics.
      const std::int64_t col0 = ct * S::bn;
      const bool ragged = col0 + S::bn > g.cols;
      if (p.terms.has_raw_terms()) add_raw_terms(acc, p.terms, row0 + local_row, col0 + lane_col, g);
      if constexpr (Capped) {
#pragma unroll
        for (int i = 0; i < 128; ++i) acc[i] = cs.cap.ratio(acc[i]);
      } else {
        transform_logits(acc, p.terms.transform);
      }
      float half[2] = {-inf_f(), -inf_f()};  // per 128-column half, over valid rows (of r when capped)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int lr = local_row + 8 * r;
        const std::int64_t row = row0 + lr;
        const std::int64_t col_thread = col0 + lane_col;
        if (ragged) {
#pragma unroll
          for (int j = 0; j < 32; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (col_thread + 8 * j + e >= g.cols) acc[4 * j + 2 * r + e] = -inf_f();
        }
        float hm[2] = {-inf_f(), -inf_f()};
#pragma unroll
        for (int j = 0; j < 32; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) hm[j / 16] = fmaxf(hm[j / 16], acc[4 * j + 2 * r + e]);
        if (row < g.rows) {
          half[0] = fmaxf(half[0], hm[0]);
          half[1] = fmaxf(half[1], hm[1]);
        }
        float m = fmaxf(hm[0], hm[1]);
        if constexpr (KeepLogits) {  // the row's max over the tile (the four lanes of a row agree on it), then z - m
          m = fmaxf(m, shuffle_xor(m, 1));
          m = fmaxf(m, shuffle_xor(m, 2));
          // In 8-byte runs (paired_runs). The row's address and how many runs lie inside the stored width are
          // worked out once per row slot, so that each store is one instruction.
          const kept_logits& k = prm.kept;
          const paired_runs runs(lane);
          const std::int64_t first = col0 + runs.first, left = k.ld - first;
          const int limit = row >= g.rows ? 0 : !ragged ? S::bn : int(left < 0 ? 0 : left < S::bn ? left : S::bn);
          __half* out = k.logits + (row < g.rows ? row : 0) * k.ld + first;
          auto pair = [&](int j) {
            const __half2 h = __floats2half2_rn(acc[4 * j + 2 * r] - m, acc[4 * j + 2 * r + 1] - m);
            return *reinterpret_cast<const std::uint32_t*>(&h);
          };
#pragma unroll
          for (int b = 0; b < 16; ++b) {
            const uint2 four = runs.trade(pair(2 * b), pair(2 * b + 1));
            if (16 * b < limit) *reinterpret_cast<uint2*>(out + 16 * b) = four;
          }
          if (row < g.rows && lane % 4 == 0) k.ref[row * k.ref_ld + ct] = m;
        }
        const std::int32_t target = targets[lr];
        const bool has_target = target >= col0 && target < col0 + S::bn;
        const int skip = has_target ? int(target - col_thread) : -1;
        // The thread's 64 logits of the row slot: i = 2 j + e at local column 8 j + e.
        const auto z = [&](int i) { return acc[4 * (i / 2) + 2 * r + i % 2]; };
        const auto col = [](int i) { return 8 * (i / 2) + i % 2; };
        softmax_stats tile;
        if (!has_target && !ragged) {
          if constexpr (Capped)
            tile = row_softmax_capped<64, 4, false>(cs, z, col);
          else
            tile = row_softmax<64, 4, false>(z, col, m);
        } else {  // the last vocab tile, or the target's: its logit is kept apart (row_output.hpp) and recorded
          const int limit = int(g.cols - col_thread < S::bn ? g.cols - col_thread : S::bn);
          if constexpr (Capped)
            tile = row_softmax_capped<64, 4, true>(cs, z, col, skip, limit);
          else
            tile = row_softmax<64, 4, true>(z, col, m, skip, limit);
#pragma unroll
          for (int j = 0; j < 32; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (8 * j + e == skip) p.target_logit[row] = logit(acc[4 * j + 2 * r + e]);
        }
        part[r].softmax = softmax_merge(part[r].softmax, tile);
        if (p.smoothing || p.argmax) {
#pragma unroll
          for (int j = 0; j < 32; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const std::int64_t col = col_thread + 8 * j + e;
              if (col >= g.cols) continue;
              const float z = logit(acc[4 * j + 2 * r + e]);
              if (p.smoothing) part[r].weighted_logit_sum += (p.class_weights ? p.class_weights[col] : 1.f) * z;
              if (p.argmax && argmax_better(z, std::int32_t(col), part[r].argmax_value, part[r].argmax_index)) {
                part[r].argmax_value = z;
                part[r].argmax_index = std::int32_t(col);
              }
            }
        }
      }

      if (p.tile_max) {  // the filter's per-tile max, on its 128 x 128 grid: each warp folds in its 16 rows
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int mask = 16; mask > 0; mask /= 2) half[h] = fmaxf(half[h], shuffle_xor(half[h], mask));
          half[h] = logit(half[h]);
        }
        const std::int64_t filter_tile = 2 * ct + lane;
        if (lane < 2 && filter_tile < g.col_tiles() && rt < g.row_tiles())
          atomic_max_float(p.tile_max + rt * g.col_tiles() + filter_tile, lane == 0 ? half[0] : half[1]);
      }
    }

    // The four lanes of a row merge their statistics in a fixed order; lane 0 stores the split's partial.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_partial q = part[r];
#pragma unroll
      for (int mask = 1; mask < 4; mask *= 2) q = merge(q, shuffle_xor(q, mask, p.smoothing, p.argmax));
      const std::int64_t row = row0 + local_row + 8 * r;
      if (lane % 4 == 0 && row < g.rows) p.partials[row * p.splits + split] = q;
    }
  }
#endif
}

}  // namespace cce::detail::sm90
