// The small kernels around the tile kernels: the forward finaliser and loss reduction, the class-weight total,
// the backward's per-row coefficients, the bias-gradient reduction and the low-rank head's thin products.
// Reductions use CUB block primitives over a fixed partition, so results are bitwise repeatable.
// Kernels with no parameter of their own are templates of nothing (`template <class = void>`): a header's
// non-template kernel is defined in every translation unit that includes it, and two such units would not link.
#pragma once

#include <cub/block/block_reduce.cuh>

#include <cstdint>
#include <type_traits>

#include <cce/detail/element_type.hpp>
#include <cce/detail/targets.hpp>
#include <cce/dispatch/plan.hpp>
#include <cce/epilogue/row_loss.hpp>
#include <cce/epilogue/row_output.hpp>
#include <cce/epilogue/shard_stats.hpp>
#include <cce/filter/predicates.hpp>
#include <cce/options.hpp>
#include <cce/problem.hpp>
#include <cce/status.hpp>

namespace cce::detail {

struct pair_sum {
  float loss, weight;
};
struct pair_plus {
  __device__ __forceinline__ pair_sum operator()(const pair_sum& a, const pair_sum& b) const {
    return {a.loss + b.loss, a.weight + b.weight};
  }
};

// W = sum_v w_v, one block, fixed order.
template <int Threads>
__global__ void __launch_bounds__(Threads) class_weight_total_kernel(const float* weights, std::int64_t v, float* total) {
  using reduce = cub::BlockReduce<float, Threads>;
  __shared__ typename reduce::TempStorage tmp;
  float s = 0.f;
  for (std::int64_t i = threadIdx.x; i < v; i += Threads) s += weights ? weights[i] : 1.f;
  s = reduce(tmp).Sum(s);
  if (threadIdx.x == 0) *total = s;
}

// W, label smoothing's share: with class weights their sum, which class_weight_total_kernel saved; else V.
struct weight_total_reader {
  const float* summed = nullptr;  // null without class weights
  float classes = 0.f;
  __device__ __forceinline__ float operator()() const { return summed ? *summed : classes; }
};

// Rows: split_rows (one problem's forward) or shard_rows (the gathered statistics of every vocabulary shard).
template <class Rows>
struct finalise_params {
  Rows rows;
  std::int64_t n = 0;
  const float* class_weights = nullptr;  // of the whole vocabulary
  weight_total_reader weight_total;
  target_reader labels;
  float smoothing = 0.f, z_loss = 0.f, inv_classes = 0.f;
  cce::reduction reduction = reduction::mean;
  float* lse_saved = nullptr;
  float* lse_others_saved = nullptr;
  forward_outputs out;
  float* block_sums = nullptr;
};

// The split partials of a block's rows (`Threads` from first_row), each row's merged in split order as
// split_rows::read merges them, bit for bit. A thread per row loading its own partials touches a cache line per lane
// (18 us for 8,192 rows of 33-35 splits, H100). Here the block copies `Chunk` splits of all its rows at a time into
// shared memory, with loads that run along the rows' contiguous partials, and each thread merges its row's from
// there; the next chunk's loads are issued into registers before the merge, so that each chunk waits on memory once
// and under the previous chunk's merges. Every thread of the block calls it; rows at or past n get an empty partial.
template <int Threads, int Chunk = 4>
__device__ row_partial merge_split_partials(const split_rows& src, std::int64_t first_row, std::int64_t n) {
  static_assert(sizeof(row_partial) % sizeof(float2) == 0, "partials move as 8-byte words");
  constexpr int partial_words = int(sizeof(row_partial) / sizeof(float2));
  constexpr int words = Chunk * partial_words;  // a row's words of one chunk, and a thread's loads of one chunk
  constexpr int pitch = words + 1;              // odd: fewer bank conflicts
  __shared__ float2 stage[Threads * pitch];
  const int rows = int(n - first_row < Threads ? n - first_row : Threads);
  const auto* partials = reinterpret_cast<const float2*>(src.partials + first_row * src.splits);
  const std::int64_t row_words = src.splits * partial_words;
  const auto live_words = [&](std::int64_t s0) {
    return int(src.splits - s0 < Chunk ? src.splits - s0 : Chunk) * partial_words;
  };
  // Word k of the thread's share of a chunk is word i % words of row i / words, i = threadIdx.x + k Threads:
  // each_word(s0, f) calls f(k, r, w) for those that exist.
  const auto each_word = [&](std::int64_t s0, const auto& f) {
    const int live = live_words(s0);
#pragma unroll
    for (int k = 0; k < words; ++k) {
      const int i = int(threadIdx.x) + k * Threads, r = i / words, w = i % words;
      if (r < rows && w < live) f(k, r, w);
    }
  };
  float2 next[words];
  const auto fetch = [&](std::int64_t s0) {
    each_word(s0, [&](int k, int r, int w) { next[k] = partials[r * row_words + s0 * partial_words + w]; });
  };
  row_partial merged;
  fetch(0);
  for (std::int64_t s0 = 0; s0 < src.splits; s0 += Chunk) {
    each_word(s0, [&](int k, int r, int w) { stage[r * pitch + w] = next[k]; });
    __syncthreads();
    if (s0 + Chunk < src.splits) fetch(s0 + Chunk);
    if (int(threadIdx.x) < rows) {
      const auto* mine = reinterpret_cast<const row_partial*>(stage + threadIdx.x * pitch);
      for (int c = 0; c < live_words(s0) / partial_words; ++c) merged = s0 + c == 0 ? mine[c] : merge(merged, mine[c]);
    }
    __syncthreads();
  }
  return merged;
}

// One thread per row: merge the row's partials in their fixed order, write its outputs, sum (loss, w_y) per block.
template <int Threads, class Rows>
__global__ void __launch_bounds__(Threads) finalise_kernel(const __grid_constant__ finalise_params<Rows> prm) {
  using reduce = cub::BlockReduce<pair_sum, Threads>;
  __shared__ typename reduce::TempStorage tmp;
  const std::int64_t row = std::int64_t(blockIdx.x) * Threads + threadIdx.x;
  row_partial p;
  if constexpr (std::is_same_v<Rows, split_rows>)
    p = merge_split_partials<Threads>(prm.rows, std::int64_t(blockIdx.x) * Threads, prm.n);
  pair_sum mine{0.f, 0.f};
  if (row < prm.n) {
    const row_label lab = prm.labels(row);
    const bool kept = lab.kind == row_label::kept;
    float target_logit = 0.f;
    bool consistent = true;
    if constexpr (std::is_same_v<Rows, split_rows>)
      target_logit = kept ? prm.rows.target_logit[row] : 0.f;
    else
      consistent = prm.rows.read(row, kept ? lab.target : -1, p, target_logit);
    const loss_terms terms{prm.smoothing, prm.z_loss, prm.inv_classes, prm.weight_total()};
    const float w = kept && prm.class_weights ? prm.class_weights[lab.target] : 1.f;
    const row_result r = finalise_row(p, lab, target_logit, kept ? w : 0.f, terms);
    prm.lse_saved[row] = r.lse;
    prm.lse_others_saved[row] = r.lse_others;
    if (prm.out.lse) prm.out.lse[row] = r.lse;
    if (prm.out.entropy) prm.out.entropy[row] = r.entropy;
    if (prm.out.target_logprob) prm.out.target_logprob[row] = r.target_logprob;
    if (prm.out.correct) prm.out.correct[row] = r.correct;
    if (prm.reduction == reduction::none) prm.out.loss[row] = r.loss;
    if (prm.out.error) {
      if (lab.kind == row_label::invalid) *prm.out.error = int(status::invalid_target);
      if (!consistent) *prm.out.error = int(status::invalid_size);
    }
    mine = {r.loss, r.weight};
  }
  const pair_sum total = reduce(tmp).Reduce(mine, pair_plus{});
  if (threadIdx.x == 0) {
    prm.block_sums[2 * blockIdx.x] = total.loss;
    prm.block_sums[2 * blockIdx.x + 1] = total.weight;
  }
}

// A vocabulary shard's statistics: the header, then per row its split partials merged in order and the target
// logit when the shard holds the target (the argmax index becomes a global class id).
struct shard_stats_params {
  split_rows rows;
  std::int64_t n = 0;
  target_reader labels;
  unsigned char* stats = nullptr;
};

template <class = void>
__global__ void shard_stats_kernel(const __grid_constant__ shard_stats_params prm) {
  const std::int64_t row = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row == 0) {
    *reinterpret_cast<shard_stats_header*>(prm.stats) = {prm.labels.first_class, prm.labels.columns};
  }
  if (row >= prm.n) return;
  row_partial p;
  float target_logit = 0.f;
  prm.rows.read(row, prm.labels.column(prm.labels(row)), p, target_logit);
  reinterpret_cast<shard_row_stats*>(prm.stats + shard_rows_offset)[row] =
      make_shard_row_stats(p, target_logit, prm.labels.first_class);
}

// The finaliser's weight sums (block_sums' odd slots, its loss slots zeroed) from the targets alone, over the same
// blocks in the same order, so that the normaliser loss_total_kernel makes of them is the one the finaliser's give:
// loss_and_grad's row blocks need it for their gradients before the last block's statistics exist.
template <int Threads>
__global__ void __launch_bounds__(Threads)
    row_weight_kernel(std::int64_t n, const __grid_constant__ target_reader labels, const float* class_weights,
                      float* block_sums) {
  using reduce = cub::BlockReduce<pair_sum, Threads>;
  __shared__ typename reduce::TempStorage tmp;
  const std::int64_t row = std::int64_t(blockIdx.x) * Threads + threadIdx.x;
  pair_sum mine{0.f, 0.f};
  if (row < n) {
    const row_label lab = labels(row);
    if (lab.kind == row_label::kept) mine.weight = class_weights ? class_weights[lab.target] : 1.f;
  }
  const pair_sum total = reduce(tmp).Reduce(mine, pair_plus{});
  if (threadIdx.x == 0) {
    block_sums[2 * blockIdx.x] = 0.f;
    block_sums[2 * blockIdx.x + 1] = total.weight;
  }
}

// Sum of the finaliser's block sums: the loss (sum or mean) and the mean's normaliser.
template <int Threads>
__global__ void __launch_bounds__(Threads) loss_total_kernel(const float* block_sums, std::int64_t blocks,
                                                             cce::reduction red, float* loss, float* weight_sum) {
  using reduce = cub::BlockReduce<pair_sum, Threads>;
  __shared__ typename reduce::TempStorage tmp;
  pair_sum s{0.f, 0.f};
  for (std::int64_t b = threadIdx.x; b < blocks; b += Threads) {
    s.loss += block_sums[2 * b];
    s.weight += block_sums[2 * b + 1];
  }
  s = reduce(tmp).Reduce(s, pair_plus{});
  if (threadIdx.x == 0) {
    *weight_sum = s.weight;
    if (red == reduction::sum) *loss = s.loss;
    if (red == reduction::mean) *loss = s.loss / s.weight;  // all rows ignored: 0 / 0 = NaN, as torch
  }
}

struct coefficient_params {
  std::int64_t n = 0;
  target_reader labels;
  const float* grad = nullptr;  // 1 or N values, null means 1
  bool per_row_grad = false;
  bool mean = false;
  const float* weight_sum = nullptr;
  const float* lse = nullptr;
  const float* class_weights = nullptr;  // of the whole vocabulary
  weight_total_reader weight_total;
  const float* lse_others = nullptr;
  float smoothing = 0.f, z_loss = 0.f, inv_classes = 0.f;
  row_coefficients* coef = nullptr;
  // The baseline of near-uniform rows, when planned (row_scale not null): row i's tile maxima peak at
  // block_max[(first_row + i) / bm].
  const float* block_max = nullptr;
  std::int64_t first_row = 0;
  int bm = 1;
  filter::near_uniform uniform{};
  float inv_temperature = 1.f;
  float* row_scale = nullptr;  // N, from first_row
  int* baseline_state = nullptr;
  // The first-order test's gate (plan::linear): rows that may pass it mark baseline_state[2]; linear_scale (N, from
  // first_row) starts at 0 (linear_rows_kernel sets the rows that pass).
  filter::near_uniform_linear linear{};
  float* linear_scale = nullptr;
  // With plan::linear_rows: 0 for every row (lone_targets.cuh may set it next) but, with `baseline_targets_apart`
  // (plan::linear), a row that takes the baseline, which leaves its one-hot term to after the walk (ce / T into
  // target_scale, its target into target_class, none in its coefficients). From first_row.
  float* target_scale = nullptr;
  std::int32_t* target_class = nullptr;
  bool baseline_targets_apart = false;
};

template <class = void>
__global__ void coefficients_kernel(const __grid_constant__ coefficient_params prm) {
  const std::int64_t row = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= prm.n) return;
  const row_label lab = prm.labels(row);
  row_coefficients rc;
  rc.lse = prm.lse[row];
  if (lab.kind == row_label::kept) {
    float g = prm.grad ? prm.grad[prm.per_row_grad ? row : 0] : 1.f;
    if (prm.mean) g /= *prm.weight_sum;
    const loss_terms terms{prm.smoothing, prm.z_loss, prm.inv_classes, prm.weight_total()};
    rc.lse_others = prm.lse_others[row];
    rc.dz = make_dlogit_coefficients(terms, g, rc.lse, prm.class_weights ? prm.class_weights[lab.target] : 1.f,
                                     -exp_f(rc.lse_others - rc.lse));
    rc.target = prm.labels.column(lab);  // the -1 of p - onehot only in the shard that holds the target
    rc.kept = true;
    // NaN in either operand makes the comparison false: no baseline.
    const float z_max = prm.row_scale ? prm.block_max[(prm.first_row + row) / prm.bm] : 0.f;
    if (prm.row_scale && prm.uniform.holds(z_max, rc.lse)) {
      rc.dz.baseline = (rc.dz.ce + rc.dz.extra) * prm.inv_classes;
      prm.baseline_state[0] = 1;
    }
    if (prm.linear_scale && prm.linear.plausible(z_max, rc.lse)) prm.baseline_state[2] = 1;
  }
  if (prm.row_scale) prm.row_scale[row] = rc.dz.baseline * prm.inv_temperature;
  if (prm.linear_scale) prm.linear_scale[row] = 0.f;
  if (prm.target_scale) {
    const bool apart = prm.baseline_targets_apart && rc.dz.baseline != 0.f;
    prm.target_scale[row] = apart ? rc.dz.ce * prm.inv_temperature : 0.f;
    prm.target_class[row] = apart ? rc.target : -1;
    if (apart) rc.target = -1;
  }
  prm.coef[row] = rc;
}

// dBias[v0 + c] (+)= sum over row tiles of the partial column sums, in row-tile order. With `classes` (the
// sorted walk) the sum of column c goes to dBias[classes[c]] instead, `out` being dBias itself.
// `every_class`, when given, is added to each class (the near-uniform rows' baselines, uniform_baseline.cuh).
template <class G>
__global__ void dbias_kernel(const float* partial, std::int64_t row_tiles, std::int64_t ld, std::int64_t cols,
                             bool accumulate, G* out, const std::int32_t* classes = nullptr,
                             const float* every_class = nullptr) {
  const std::int64_t c = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float s = every_class ? *every_class : 0.f;
  for (std::int64_t rt = 0; rt < row_tiles; ++rt) s += partial[rt * ld + c];
  G* o = out + (classes ? std::int64_t(classes[c]) : c);
  float prev = 0.f;
  if (accumulate) prev = to_float(*o);
  *o = from_float<G>(prev + s);
}

// out = (accumulate ? out : 0) + acc: the last step of a gradient carried in fp32. With `classes`, row i / width
// of acc goes to row classes[i / width] of out (the sorted walk's scatter).
template <class G>
__global__ void fold_kernel(const float* acc, std::int64_t count, bool accumulate, G* out,
                            const std::int32_t* classes = nullptr, std::int64_t width = 1) {
  const std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  G* o = out + (classes ? std::int64_t(classes[i / width]) * width + i % width : i);
  float prev = 0.f;
  if (accumulate) prev = to_float(*o);
  *o = from_float<G>(prev + acc[i]);
}

// Thin products of the low-rank head, out(M x N) = alpha * sum_k a(m, k) b(k, n) (+ out when `add`), with
// element strides for both operands so transposes are free. M, N or K is the rank, so a plain fp32 loop per
// output element reading through L1 is adequate: these products are O(rank) of the main ones.
template <class TA, class TB, class G>
struct thin_product {
  const TA* a = nullptr;
  std::int64_t a_m = 0, a_k = 0;  // element strides of a along m and k
  const TB* b = nullptr;
  std::int64_t b_k = 0, b_n = 0;
  std::int64_t m = 0, n = 0, k = 0;
  float alpha = 1.f;
  // When a is dZ (or dZ^T, `a_transposed`): the tile flags of the dZ kernel; filtered tiles hold no data.
  const std::uint8_t* dz_active = nullptr;
  std::int64_t dz_bm = 1, dz_bn = 1, dz_chunk_tiles = 0;
  bool a_transposed = false;
  G* out = nullptr;
  std::int64_t out_m = 0, out_n = 1;
  bool add = false;
};

template <class TA, class TB, class G>
__global__ void thin_product_kernel(const __grid_constant__ thin_product<TA, TB, G> prm) {
  const std::int64_t idx = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= prm.m * prm.n) return;
  const std::int64_t i = idx / prm.n, j = idx % prm.n;
  float s = 0.f;
  for (std::int64_t kk = 0; kk < prm.k; ++kk) {
    if (prm.dz_active) {
      const std::int64_t row = prm.a_transposed ? kk : i, col = prm.a_transposed ? i : kk;
      if (!prm.dz_active[(row / prm.dz_bm) * prm.dz_chunk_tiles + col / prm.dz_bn]) continue;
    }
    float av, bv;
    if constexpr (std::is_same_v<TA, float>) av = prm.a[i * prm.a_m + kk * prm.a_k];
    else av = to_float(prm.a[i * prm.a_m + kk * prm.a_k]);
    if constexpr (std::is_same_v<TB, float>) bv = prm.b[kk * prm.b_k + j * prm.b_n];
    else bv = to_float(prm.b[kk * prm.b_k + j * prm.b_n]);
    s += av * bv;
  }
  G* o = prm.out + i * prm.out_m + j * prm.out_n;
  float prev = 0.f;
  if (prm.add) {
    if constexpr (std::is_same_v<G, float>) prev = *o;
    else prev = to_float(*o);
  }
  if constexpr (std::is_same_v<G, float>) *o = prev + prm.alpha * s;
  else *o = from_float<G>(prev + prm.alpha * s);
}

}  // namespace cce::detail
