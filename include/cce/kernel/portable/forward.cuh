// Forward kernel: one CTA per (row tile, vocab split). For each vocab tile of its split it computes the logit
// tile on the mainloop, then folds it into per-row online-softmax partials in registers, picks up the target
// logit and records the tile's max logit for the backward's gradient filter. Logits never leave the chip.
#pragma once

#include <cstdint>

#include <cce/detail/targets.hpp>
#include <cce/epilogue/logit_terms.hpp>
#include <cce/epilogue/row_partial.hpp>
#include <cce/kernel/portable/mainloop.cuh>
#include <cce/kernel/portable/warp_reduce.cuh>
#include <cce/tile/tile_grid.hpp>

namespace cce::detail {

template <class T>
struct forward_params {
  operand<T> e;  // N x D, k-major
  operand<T> c;  // V x D, k-major
  logit_terms<T> terms;
  const float* class_weights = nullptr;  // of the problem's classes
  target_reader labels;
  tile::tile_grid grid;
  std::int64_t splits = 1;
  bool smoothing = false;  // accumulate sum_v w_v z_v
  bool argmax = false;     // track the argmax (accuracy output)
  row_partial* partials = nullptr;  // N x splits
  float* target_logit = nullptr;    // N
  float* tile_max = nullptr;        // row_tiles x col_tiles, or null
};

template <class T, class Policy, bool Vectorized>
__global__ void __launch_bounds__(Policy::threads, Policy::min_blocks) forward_kernel(const __grid_constant__ forward_params<T> prm) {
  using mainloop = mainloop_for<T, Policy, major::k, major::k>;
  using layout = typename mainloop::fragment_layout;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float warp_max[Policy::warps];

  const tile::tile_grid& g = prm.grid;
  const std::int64_t rt = blockIdx.x, split = blockIdx.y;
  const std::int64_t row0 = g.row_begin(rt);
  const std::int64_t ct_begin = tile::split_begin(g.col_tiles(), prm.splits, split);
  const std::int64_t ct_end = tile::split_begin(g.col_tiles(), prm.splits, split + 1);
  const layout f;

  // Targets of the tile's rows, read once. The running row statistics live in shared memory, one entry per
  // (row, warp column), each read and written only by the lane that owns the row slot after each tile's
  // butterfly (slot s belongs to lane s % row_lanes of its group): no barrier, and no registers held across the
  // mainloop.
  __shared__ std::int32_t targets[Policy::bm];
  __shared__ row_partial running[Policy::bm * layout::row_groups];
  for (int r = threadIdx.x; r < Policy::bm; r += Policy::threads) {
    const std::int64_t row = row0 + r;
    targets[r] = row < g.rows ? prm.labels.column(prm.labels(row)) : -1;
  }
#pragma unroll
  for (int s = 0; s < layout::row_slots; ++s) {
    if (f.row_lane() == s % layout::row_lanes) running[f.row(s) * layout::row_groups + f.row_group()] = row_partial{};
  }

  for (std::int64_t ct = ct_begin; ct < ct_end; ++ct) {
    const std::int64_t col0 = g.col_begin(ct);
    typename mainloop::accumulators acc;
    mainloop::clear(acc);
    mainloop::template run<Vectorized>(acc, smem, prm.e, row0, prm.c, col0, 0, prm.e.depth);

    float tmax = -inf_f();
#pragma unroll
    for (int s = 0; s < layout::row_slots; ++s) {
      const std::int64_t row = row0 + f.row(s);
      row_partial tile;
      if (row < g.rows) {
        // Two passes over the slot's columns: the max first, so each logit costs one exp. The logits overwrite
        // their accumulators.
        float slot_max = -inf_f();
#pragma unroll
        for (int c = 0; c < layout::cols; ++c) {
          const std::int64_t col = col0 + f.col(c);
          float& z = layout::at(acc, s, c);
          z = col < g.cols ? prm.terms(z, row, col) : -inf_f();
          slot_max = max_f(slot_max, z);
        }
        const std::int32_t target = targets[f.row(s)];
        tile.softmax.max = slot_max;
#pragma unroll
        for (int c = 0; c < layout::cols; ++c) {
          const std::int64_t col = col0 + f.col(c);
          if (col >= g.cols) continue;
          const float z = layout::at(acc, s, c);
          if (col != target) {  // the target's logit is kept apart (row_output.hpp)
            const float w = exp_f(z - slot_max);
            tile.softmax.sum_exp += w;
            tile.softmax.sum_exp_z += w * z;
          }
          if (prm.smoothing) tile.weighted_logit_sum += (prm.class_weights ? prm.class_weights[col] : 1.f) * z;
          if (prm.argmax && argmax_better(z, std::int32_t(col), tile.argmax_value, tile.argmax_index)) {
            tile.argmax_value = z;
            tile.argmax_index = std::int32_t(col);
          }
          if (col == target) prm.target_logit[row] = z;
        }
        tmax = max_f(tmax, slot_max);
      }
      // Lanes sharing the row combine the tile's partial; the owner folds it into the running statistics.
#pragma unroll
      for (int i = 0; i < layout::row_shuffle_count; ++i) {
        tile = merge(tile, shuffle_xor(tile, layout::row_shuffle_first << i, prm.smoothing, prm.argmax));
      }
      if (f.row_lane() == s % layout::row_lanes) {
        row_partial& r = running[f.row(s) * layout::row_groups + f.row_group()];
        r = merge(r, tile);
      }
    }

    if (prm.tile_max) {
      tmax = warp_max_all(tmax);
      if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = tmax;
      __syncthreads();
      if (threadIdx.x == 0) {
        float m = warp_max[0];
        for (int w = 1; w < Policy::warps; ++w) m = max_f(m, warp_max[w]);
        prm.tile_max[rt * g.col_tiles() + ct] = m;
      }
      // The next write of warp_max follows the next mainloop's barriers.
    }
  }

  // Combine the partials of the warps that share a row, in a fixed order, and store them.
  __syncthreads();
  for (int r = threadIdx.x; r < Policy::bm; r += Policy::threads) {
    const std::int64_t row = row0 + r;
    if (row >= g.rows) continue;
    row_partial p = running[r * layout::row_groups];
    for (int k = 1; k < layout::row_groups; ++k) p = merge(p, running[r * layout::row_groups + k]);
    prm.partials[row * prm.splits + split] = p;
  }
}

}  // namespace cce::detail
