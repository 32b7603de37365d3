// Forward kernel: one CTA per (row tile, vocab split). For each vocab tile of its split it computes the logit
// tile on the mainloop, then folds it into per-row online-softmax partials in registers, picks up the target
// logit and records the tile's max logit for the backward's gradient filter. Logits never leave the chip.
// Only the vocabulary's last tile and a row's target tile take the masked path of the epilogue.
//
// A CTA's vocab tile may span several of the filter's tiles (the grid's): wide_policy (mainloop.cuh).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cce/detail/targets.hpp>
#include <cce/epilogue/logit_terms.hpp>
#include <cce/epilogue/row_partial.hpp>
#include <cce/kernel/portable/fast_math.cuh>
#include <cce/kernel/portable/fragment_logits.cuh>
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
  bool smoothing = false;           // accumulate sum_v w_v z_v
  bool argmax = false;              // track the argmax (accuracy output)
  row_partial* partials = nullptr;  // N x splits
  float* target_logit = nullptr;    // N
  float* tile_max = nullptr;        // row_tiles x col_tiles, or null
};

// Sums of w = weight(v(i)) and of w v(i) over Count values of one row, in Chains independent chains of adds: v(i) is
// the i-th, col(i) its local column. Masked: only columns below `limit` other than `skip` (the target's, kept apart:
// row_output.hpp) count.
struct weighted_sums {
  float w = 0.f, wv = 0.f;
};
template <int Count, int Chains, bool Masked, class Value, class Weight, class Column>
__device__ __forceinline__ weighted_sums row_weighted_sums(const Value& v, const Weight& weight, const Column& col,
                                                           int skip, int limit) {
  static_assert(Chains == 2 || Chains == 4, "pairwise sums of the chains");
  float sum[Chains] = {}, sum_v[Chains] = {};
#pragma unroll
  for (int i = 0; i < Count; ++i) {
    if (Masked && (col(i) == skip || col(i) >= limit)) continue;
    const float vi = v(i), w = weight(vi);
    sum[i % Chains] += w;
    sum_v[i % Chains] = fmaf(w, vi, sum_v[i % Chains]);
  }
  weighted_sums s{sum[0] + sum[1], sum_v[0] + sum_v[1]};
  if constexpr (Chains == 4) {
    s.w += sum[2] + sum[3];
    s.wv += sum_v[2] + sum_v[3];
  }
  return s;
}

// Sum of exp(z - m) and exp(z - m) z over Count logits z(i) of one row whose max is m (row_weighted_sums).
template <int Count, int Chains, bool Masked, class Logit, class Column>
__device__ __forceinline__ softmax_stats row_softmax(const Logit& z, const Column& col, float m, int skip = -1,
                                                     int limit = 0) {
  softmax_stats st;
  if (m == -inf_f()) return st;
  st.max = m;
  // not fma(zi, log2e, -m log2e): m log2e rounds at large m
  const auto weight = [m](float zi) { return exp2_approx((zi - m) * log2e); };
  const weighted_sums s = row_weighted_sums<Count, Chains, Masked>(z, weight, col, skip, limit);
  st.sum_exp = s.w;
  st.sum_exp_z = s.wv;
  return st;
}

// row_softmax of softcapped logits held as ratios r(i) (capped_softmax), against the fixed reference.
template <int Count, int Chains, bool Masked, class Ratio, class Column>
__device__ __forceinline__ softmax_stats row_softmax_capped(const capped_softmax& cs, const Ratio& r, const Column& col,
                                                            int skip = -1, int limit = 0) {
  const auto weight = [&cs](float ri) { return cs.weight(ri); };
  const weighted_sums s = row_weighted_sums<Count, Chains, Masked>(r, weight, col, skip, limit);
  return cs.stats(s.w, s.wv);
}

// The softmax statistics of a thread's row slots over a CTA's run of vocab tiles, spread over the lanes sharing the
// rows: after each tile the lanes reduce-scatter the tile's statistics in a fixed butterfly (each step keeps half of
// the slots and merges the partner lane's statistics of that half into them), so that a thread holds row_slots /
// row_lanes of them across the mainloop instead of all: registers the wide tile's mainloop needs. Layouts whose
// slots do not divide among the lanes (the fp32 one) keep every slot and merge the lanes at the end.
template <class Layout>
struct lane_row_stats {
  static constexpr bool spread = Layout::row_slots % Layout::row_lanes == 0;
  static constexpr int held = spread ? Layout::row_slots / Layout::row_lanes : Layout::row_slots;
  softmax_stats part[held];

  // The row slot of held position j.
  __device__ __forceinline__ static int slot(int j) {
    if constexpr (spread) {
#pragma unroll
      for (int i = 0; i < Layout::row_shuffle_count; ++i)
        if (threadIdx.x & (Layout::row_shuffle_first << i)) j += Layout::row_slots >> (i + 1);
    }
    return j;
  }
  // Folds one tile's statistics of every slot (overwritten).
  __device__ __forceinline__ void fold(softmax_stats (&tile)[Layout::row_slots]) {
    if constexpr (spread) {
#pragma unroll
      for (int i = 0; i < Layout::row_shuffle_count; ++i) {
        const int mask = Layout::row_shuffle_first << i, half = Layout::row_slots >> (i + 1);
        const bool upper = (threadIdx.x & mask) != 0;
#pragma unroll
        for (int j = 0; j < half; ++j) {
          const softmax_stats keep = upper ? tile[j + half] : tile[j], send = upper ? tile[j] : tile[j + half];
          tile[j] = softmax_merge(
              keep, {shuffle_xor(send.max, mask), shuffle_xor(send.sum_exp, mask), shuffle_xor(send.sum_exp_z, mask)});
        }
      }
    }
#pragma unroll
    for (int j = 0; j < held; ++j) part[j] = softmax_merge(part[j], tile[j]);
  }
  // The statistics of held position j over all the lanes sharing its row: spread, this lane's alone; otherwise
  // merged in a fixed butterfly (every lane gets them).
  __device__ __forceinline__ softmax_stats merged(int j) const {
    softmax_stats q = part[j];
    if constexpr (!spread) {
#pragma unroll
      for (int i = 0; i < Layout::row_shuffle_count; ++i) {
        const int mask = Layout::row_shuffle_first << i;
        q = softmax_merge(q, {shuffle_xor(q.max, mask), shuffle_xor(q.sum_exp, mask), shuffle_xor(q.sum_exp_z, mask)});
      }
    }
    return q;
  }
};

// What the forward keeps per row across its vocab tiles besides the softmax statistics (those stay in registers):
// label smoothing's weighted logit sum and the argmax, when asked for.
struct kept_row {
  float weighted_logit_sum = 0.f;
  float argmax_value = -inf_f();
  std::int32_t argmax_index = -1;

  __device__ row_partial with(const softmax_stats& s) const {
    row_partial p;
    p.softmax = s;
    p.weighted_logit_sum = weighted_logit_sum;
    p.argmax_value = argmax_value;
    p.argmax_index = argmax_index;
    return p;
  }
  __device__ void fold(const row_partial& x) {  // as merge(with(...), x) does
    weighted_logit_sum += x.weighted_logit_sum;
    if (!argmax_better(argmax_value, argmax_index, x.argmax_value, x.argmax_index)) {
      argmax_value = x.argmax_value;
      argmax_index = x.argmax_index;
    }
  }
};

// Dynamic shared memory of forward_kernel: the mainloop's stages, then, with label smoothing or the argmax, a
// kept_row per row (1.5 KiB at 128 rows). The row groups' partials meet in the drained stages. The default
// 16-bit policy's 96 KiB of stages then fit the 99 KiB of an sm_86 / sm_89 CTA with or without them.
template <class T, class Policy>
constexpr std::size_t forward_smem_bytes(bool extras) {
  using mainloop = mainloop_for<T, Policy, major::k, major::k>;
  static_assert(
      mainloop::smem_bytes >= std::size_t(Policy::bm) * mainloop::fragment_layout::row_groups * sizeof(row_partial),
      "the row groups' partials pass through the stages");
  return mainloop::smem_bytes + (extras ? std::size_t(Policy::bm) * sizeof(kept_row) : 0);
}

// Spans: the filter's tiles (the grid's bn) per vocab tile of Policy; a thread's columns lie in one of them.
template <class T, class Policy, bool Vectorized, int Spans = 1>
__global__ void __launch_bounds__(Policy::threads, Policy::min_blocks)
    forward_kernel(const __grid_constant__ forward_params<T> prm) {
  using mainloop = mainloop_for<T, Policy, major::k, major::k>;
  using layout = typename mainloop::fragment_layout;
  static_assert(Spans == 1 || (Policy::bn / Spans) % Policy::warp_n == 0, "a warp's columns lie in one filter tile");
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float warp_max[Policy::warps];
  __shared__ std::int32_t warp_span[Policy::warps];
  __shared__ std::int32_t targets[Policy::bm];

  const tile::tile_grid& g = prm.grid;  // g.bn * Spans == Policy::bn
  // Blocks take their (row tile, split) in launch order over groups of row tiles (tile::l2_row_group): the CTAs
  // running at once share their E tiles in L2 instead of streaming E from memory again for every vocab tile.
  const std::int64_t e_tile_bytes = Policy::bm * prm.e.depth * std::int64_t(sizeof(T));
  const tile::grouped_order pos =
      tile::l2_grouped_order(int(blockIdx.y * gridDim.x + blockIdx.x), int(gridDim.x), int(gridDim.y), e_tile_bytes);
  const std::int64_t rt = pos.m, split = pos.n;
  const std::int64_t row0 = g.row_begin(rt);
  const std::int64_t cta_tiles = ceil_div(g.cols, std::int64_t(Policy::bn));
  const std::int64_t ct_begin = tile::split_begin(cta_tiles, prm.splits, split);
  const std::int64_t ct_end = tile::split_begin(cta_tiles, prm.splits, split + 1);
  const layout f;
  const int span = Spans == 1 ? 0 : f.col(0) / (Policy::bn / Spans);

  const bool keep_extras = prm.smoothing || prm.argmax;
  kept_row* kept = reinterpret_cast<kept_row*>(smem + mainloop::smem_bytes);  // with keep_extras only
  for (int r = threadIdx.x; r < Policy::bm; r += Policy::threads) {
    const std::int64_t row = row0 + r;
    targets[r] = row < g.rows ? prm.labels.column(prm.labels(row)) : -1;
  }
  if (keep_extras)
    for (int r = threadIdx.x; r < Policy::bm; r += Policy::threads) kept[r] = kept_row{};
  __syncthreads();

  // The softmax statistics of the CTA's rows over its run of vocab tiles stay in registers, spread over the lanes
  // (lane_row_stats); the warps sharing a row merge theirs once, at the end. Label smoothing's weighted sums and the
  // argmax, when asked for, are merged over the lanes of a row after each tile, passed through the drained stages
  // and folded into the row's kept_row in row-group order: registers held across the mainloop cost it spills.
  lane_row_stats<layout> stats;
  for (std::int64_t ct = ct_begin; ct < ct_end; ++ct) {
    const std::int64_t col0 = ct * Policy::bn;
    typename mainloop::accumulators acc;
    mainloop::clear(acc);
    mainloop::template run<Vectorized>(acc, smem, prm.e, row0, prm.c, col0, 0, prm.e.depth);

    const int limit = int(g.cols - col0 < Policy::bn ? g.cols - col0 : Policy::bn);  // local columns in range
    const bool ragged = limit < Policy::bn;
    fragment_logits(acc, f, prm.terms, row0, col0, g.rows, limit);

    float tmax = -inf_f();
    softmax_stats tile[layout::row_slots];
#pragma unroll
    for (int s = 0; s < layout::row_slots; ++s) {
      const std::int64_t row = row0 + f.row(s);
      if (row >= g.rows) continue;
      float m = -inf_f();
#pragma unroll
      for (int c = 0; c < layout::cols; ++c) {
        if (ragged && f.col(c) >= limit) layout::at(acc, s, c) = -inf_f();
        m = fmaxf(m, layout::at(acc, s, c));
      }
      tmax = fmaxf(tmax, m);
      const std::int64_t target = targets[f.row(s)];
      const bool has_target = target >= col0 && target < col0 + Policy::bn;
      const auto z = [&](int c) { return layout::at(acc, s, c); };
      const auto col = [&](int c) { return f.col(c); };
      if (!has_target && !ragged) {
        tile[s] = row_softmax<layout::cols, 2, false>(z, col, m);
      } else {  // the last vocab tile, or the target's
        const int skip = has_target ? int(target - col0) : -1;
        tile[s] = row_softmax<layout::cols, 2, true>(z, col, m, skip, limit);
#pragma unroll
        for (int c = 0; c < layout::cols; ++c)
          if (f.col(c) == skip) prm.target_logit[row] = layout::at(acc, s, c);
      }
    }
    stats.fold(tile);
    if (keep_extras) {
      row_partial* scratch = reinterpret_cast<row_partial*>(smem);  // bm x row_groups in the drained stages
#pragma unroll
      for (int s = 0; s < layout::row_slots; ++s) {
        const std::int64_t row = row0 + f.row(s);
        row_partial x;
#pragma unroll
        for (int c = 0; c < layout::cols; ++c) {
          if (row >= g.rows || f.col(c) >= limit) continue;
          const std::int64_t col = col0 + f.col(c);
          const float z = layout::at(acc, s, c);
          if (prm.smoothing) x.weighted_logit_sum += (prm.class_weights ? prm.class_weights[col] : 1.f) * z;
          if (prm.argmax && argmax_better(z, std::int32_t(col), x.argmax_value, x.argmax_index)) {
            x.argmax_value = z;
            x.argmax_index = std::int32_t(col);
          }
        }
#pragma unroll
        for (int i = 0; i < layout::row_shuffle_count; ++i)
          x = merge(x, shuffle_xor(x, layout::row_shuffle_first << i, prm.smoothing, prm.argmax));
        if (f.row_lane() == 0) scratch[f.row(s) * layout::row_groups + f.row_group()] = x;
      }
      __syncthreads();
      for (int r = threadIdx.x; r < Policy::bm; r += Policy::threads)
        for (int k = 0; k < layout::row_groups; ++k) kept[r].fold(scratch[r * layout::row_groups + k]);
      __syncthreads();  // the next mainloop refills the stages
    }

    if (prm.tile_max) {
      tmax = warp_max_all(tmax);
      if (threadIdx.x % 32 == 0) {
        warp_max[threadIdx.x / 32] = tmax;
        warp_span[threadIdx.x / 32] = span;
      }
      __syncthreads();
      const std::int64_t filter_tile = ct * Spans + threadIdx.x;
      if (threadIdx.x < Spans && filter_tile < g.col_tiles()) {
        float m = -inf_f();
        for (int w = 0; w < Policy::warps; ++w)
          if (warp_span[w] == int(threadIdx.x)) m = fmaxf(m, warp_max[w]);
        prm.tile_max[rt * g.col_tiles() + filter_tile] = m;
      }
      // The next write of warp_max follows the next mainloop's barriers.
    }
  }

  // Each row group parks its rows' statistics in the stages (the last mainloop drained them), and the row groups
  // merge in order with the kept row.
  softmax_stats* parked = reinterpret_cast<softmax_stats*>(smem);  // bm x row_groups
#pragma unroll
  for (int j = 0; j < stats.held; ++j) {
    const softmax_stats q = stats.merged(j);
    if (stats.spread || f.row_lane() == 0) parked[f.row(stats.slot(j)) * layout::row_groups + f.row_group()] = q;
  }
  __syncthreads();
  for (int r = threadIdx.x; r < Policy::bm; r += Policy::threads) {
    const std::int64_t row = row0 + r;
    if (row >= g.rows) continue;
    softmax_stats q = parked[r * layout::row_groups];
    for (int k = 1; k < layout::row_groups; ++k) q = softmax_merge(q, parked[r * layout::row_groups + k]);
    prm.partials[row * prm.splits + split] = keep_extras ? kept[r].with(q) : kept_row{}.with(q);
  }
}

}  // namespace cce::detail
