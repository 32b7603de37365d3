// The baseline of near-uniform rows (epilogue/row_loss.hpp, filter/predicates.hpp): each row tile's largest tile
// max, which decides the rows; and the column sums through which the products add the baseline's share back for
// every class: the sum of C's rows (into dE) and the rows' baselines times E (into dC, their sum into dBias).
// Each sum splits its rows into a fixed number of parts added in order, so it is the same on every run; nothing
// is computed while no row is near-uniform (uniform_baseline_buffers::state), and the classifier's sums once.
#pragma once

#include <cub/block/block_load.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/block/block_store.cuh>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <cce/detail/element_type.hpp>
#include <cce/detail/math.hpp>
#include <cce/dispatch/plan.hpp>
#include <cce/filter/predicates.hpp>
#include <cce/kernel/portable/element_run.cuh>
#include <cce/kernel/portable/warp_reduce.cuh>
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
inline constexpr std::int64_t baseline_rows_per_split = 128;
inline std::int64_t baseline_splits(std::int64_t rows) {
  return std::clamp<std::int64_t>(ceil_div(rows, baseline_rows_per_split), 1, plan::max_baseline_splits);
}

// partial[split][col] = sum over the split's rows i of weight_i x[i][col] (col < d), and of weight_i at col = d.
// A CTA takes 32 columns of a split: its warps take every baseline_warps-th row (a lane a column), then add their
// sums in warp order. The class sums run first and mark nothing; the row sums, which run next and reuse `partial`,
// mark the class sums done (state[1]), so that later calls neither recompute nor overwrite them (loss_and_grad's row
// blocks).
inline constexpr int baseline_warps = 8;
inline dim3 baseline_partial_grid(std::int64_t d, std::int64_t splits) {
  return dim3(unsigned(ceil_div(d + 1, std::int64_t(32))), unsigned(splits));
}
template <class T, baseline_sum Sum>
__global__ void __launch_bounds__(32 * baseline_warps)
    baseline_partial_kernel(const T* x, std::int64_t ldx, std::int64_t rows, std::int64_t d, const float* weights,
                            std::int64_t splits, int* state, float* partial) {
  // Nothing to add, or the sums are there; the class sums are wanted too once a row may be near-uniform to first
  // order.
  const bool wanted = state[0] || (Sum == baseline_sum::classes && state[2]);
  if (!wanted || (Sum == baseline_sum::classes && state[1])) return;
  if (Sum == baseline_sum::rows && threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0) state[1] = 1;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const std::int64_t col = std::int64_t(blockIdx.x) * 32 + lane;
  const std::int64_t r0 = tile::split_begin(rows, splits, blockIdx.y);
  const std::int64_t r1 = tile::split_begin(rows, splits, blockIdx.y + 1);
  const auto weight = [&](std::int64_t i) { return Sum == baseline_sum::classes ? 1.f : weights[i]; };
  const auto value = [&](std::int64_t i) { return col < d ? to_float(x[i * ldx + col]) : 1.f; };
  // The loads of `ahead` rows issued before their sums: one dependent load per row would leave the warp waiting on
  // memory.
  constexpr int ahead = 8, step = baseline_warps;
  float s = 0.f;
  if (col <= d) {
    std::int64_t i = r0 + warp;
    for (; i + (ahead - 1) * step < r1; i += ahead * step) {
      float w[ahead], v[ahead];
#pragma unroll
      for (int u = 0; u < ahead; ++u) {
        w[u] = weight(i + u * step);
        v[u] = value(i + u * step);
      }
#pragma unroll
      for (int u = 0; u < ahead; ++u) s += w[u] * v[u];
    }
    for (; i < r1; i += step) s += weight(i) * value(i);
  }
  __shared__ float warp_sums[baseline_warps][32];
  warp_sums[warp][lane] = s;
  __syncthreads();
  if (warp != 0 || col > d) return;
#pragma unroll
  for (int w = 1; w < baseline_warps; ++w) s += warp_sums[w][lane];
  partial[std::int64_t(blockIdx.y) * (d + 1) + col] = s;
}

// out[col] = the splits' partials in order, for col < count. Without a near-uniform row the row sums are 0 and the
// class sums stay as set (0); once done, the class sums stay.
template <baseline_sum Sum>
__global__ void baseline_total_kernel(const float* partial, std::int64_t d, std::int64_t count, std::int64_t splits,
                                      const int* state, float* out) {
  const std::int64_t col = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= count || (Sum == baseline_sum::classes && state[1])) return;
  if (!(state[0] || (Sum == baseline_sum::classes && state[2]))) {
    if (Sum == baseline_sum::rows) out[col] = 0.f;
    return;
  }
  float s = 0.f;
  for (std::int64_t k = 0; k < splits; ++k) s += partial[k * (d + 1) + col];
  out[col] = s;
}

// state[3] = the largest squared norm of the classifier's rows (its float bits: nonnegative floats order as their
// bits; NaN as a NaN), which bounds the logits of the first-order test under a softcap; with the class sums
// (whenever they are taken, so that a later row block's test finds it), from a state[3] of 0. A warp per row, 16-byte
// loads where rows allow them. The maximum does not depend on the order in which the rows arrive.
template <class T>
__global__ void class_norm_kernel(const T* c, std::int64_t ldc, std::int64_t v, std::int64_t d, int* state) {
  if (!(state[0] || state[2]) || state[1]) return;
  const int lane = threadIdx.x % 32;
  const std::int64_t warps = std::int64_t(gridDim.x) * blockDim.x / 32;
  float largest = 0.f;
  for (std::int64_t row = (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; row < v; row += warps)
    largest = max_f(largest, warp_dot(c + row * ldc, c + row * ldc, d, lane));
  if (lane == 0) atomicMax(state + 3, largest == largest ? __float_as_int(largest) : 0x7fffffff);  // NaN wins
}

// The first-order test of rows [0, n) (filter::near_uniform_linear), once some row may pass it (state[2]), with
// the class sums taken: a warp per row forms zbar = (e . class_sum / V + mean bias = 0) / T (with a softcap also
// the bound |e| max_v |c_v| / T on its logits, from state[3]) and, where the row passes, gives it the first-order
// baseline (row_loss.hpp) in place of any other, its scales for the products (row_scale, linear_scale) and marks
// state[0]. Then class_sum holds the column sums (state[1]), and class_mean their negated mean.
struct linear_rows_params {
  const void* e = nullptr;  // of T
  std::int64_t lde = 0, n = 0, d = 0;
  const float* class_sum = nullptr;
  float* class_mean = nullptr;  // D: -class_sum / V, written here
  float inv_classes = 0.f, inv_temperature = 1.f;
  filter::near_uniform_linear test{};
  row_coefficients* coef = nullptr;
  float* row_scale = nullptr;
  float* linear_scale = nullptr;
  float* target_scale = nullptr;  // the row's one-hot term left to after the walk (coefficients_kernel)
  std::int32_t* target_class = nullptr;
  int* state = nullptr;
};

template <class T>
__global__ void linear_rows_kernel(const __grid_constant__ linear_rows_params prm) {
  if (!prm.state[2]) return;
  const int lane = threadIdx.x % 32;
  const std::int64_t row = (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (blockIdx.x == 0) {
    if (threadIdx.x == 0) prm.state[1] = 1;
    for (std::int64_t k = threadIdx.x; k < prm.d; k += blockDim.x)
      prm.class_mean[k] = -prm.class_sum[k] * prm.inv_classes;
  }
  if (row >= prm.n) return;
  const T* e = static_cast<const T*>(prm.e) + row * prm.lde;
  float dot = 0.f, ss = 0.f;
  constexpr int vec = 16 / sizeof(T);  // 16-byte runs of the row where it allows them
  if (prm.d % vec == 0 && prm.lde % vec == 0 && aligned_to(prm.e, 16) && aligned_to(prm.class_sum, 16)) {
    for (std::int64_t k = vec * lane; k < prm.d; k += 32 * vec) {
      const uint4 raw = *reinterpret_cast<const uint4*>(e + k);
      const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int q = 0; q < vec / 4; ++q) {
        const float4 s = *reinterpret_cast<const float4*>(prm.class_sum + k + 4 * q);
        const float xs[4] = {to_float(x[4 * q]), to_float(x[4 * q + 1]), to_float(x[4 * q + 2]),
                             to_float(x[4 * q + 3])};
        dot += xs[0] * s.x + xs[1] * s.y + xs[2] * s.z + xs[3] * s.w;
        ss += xs[0] * xs[0] + xs[1] * xs[1] + xs[2] * xs[2] + xs[3] * xs[3];
      }
    }
  } else {
    for (std::int64_t k = lane; k < prm.d; k += 32) {
      const float x = to_float(e[k]);
      dot += x * prm.class_sum[k];
      ss += x * x;
    }
  }
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) {
    dot += __shfl_xor_sync(0xffffffffu, dot, mask);
    ss += __shfl_xor_sync(0xffffffffu, ss, mask);
  }
  if (lane != 0) return;
  row_coefficients& rc = prm.coef[row];
  const float zbar = dot * prm.inv_classes * prm.inv_temperature;
  const float bound = sqrt_f(ss * __int_as_float(prm.state[3])) * prm.inv_temperature;
  if (!rc.kept || !prm.test.holds(zbar, rc.lse, bound)) {
    prm.linear_scale[row] = 0.f;
    return;
  }
  const float kappa = exp_f(prm.test.log_kappa(zbar, rc.lse));
  rc.dz.baseline = (rc.dz.ce + rc.dz.extra) * prm.inv_classes * kappa;
  rc.dz.slope = rc.dz.baseline * prm.inv_temperature;
  rc.dz.mean_logit = zbar;
  prm.row_scale[row] = rc.dz.slope;
  prm.linear_scale[row] = rc.dz.slope * prm.inv_temperature;
  if (rc.target >= 0) prm.target_class[row] = rc.target;  // not already left to the products
  prm.target_scale[row] = rc.dz.ce * prm.inv_temperature;
  rc.target = -1;
  prm.state[0] = 1;
}

// The strictly lower triangle of the d x d matrix m from the upper one, when state[0]: 32 x 32 blocks on or below
// the diagonal, each read transposed through shared memory.
template <class T>
__global__ void mirror_lower_kernel(T* m, std::int64_t d, const int* state) {
  if (!state[0] || blockIdx.x > blockIdx.y) return;
  __shared__ T tile[32][33];
  const std::int64_t r0 = std::int64_t(blockIdx.y) * 32, c0 = std::int64_t(blockIdx.x) * 32;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {  // the upper block (c0.., r0..), row by row
    const std::int64_t r = c0 + i, c = r0 + threadIdx.x;
    if (r < d && c < d) tile[threadIdx.x][i] = m[r * d + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const std::int64_t r = r0 + i, c = c0 + threadIdx.x;
    if (r < d && c < r) m[r * d + c] = tile[i][threadIdx.x];
  }
}

// The first-order share's symmetric products in parts of their depth added onto zeros in fp32 (dispatch/portable.cuh,
// symmetric_in_parts): the zeros, and the d x d matrix gram from the upper triangle of the carries' sum (plus
// class_sum_i class_mean_j where class_sum is given), rounded to T and mirrored; each when state[0]. 32 x 32 blocks on
// or above the diagonal, the mirrored one written through shared memory.
template <class X>
__global__ void zero_if_kernel(X* x, std::int64_t count, const int* state) {
  if (!state[0]) return;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += std::int64_t(gridDim.x) * blockDim.x)
    x[i] = X{};
}
template <class T>
__global__ void finish_gram_kernel(const float* sums, std::int64_t carries, const float* class_sum,
                                   const float* class_mean, T* gram, std::int64_t d, const int* state) {
  if (!state[0] || blockIdx.x < blockIdx.y) return;
  __shared__ T tile[32][33];
  const std::int64_t r0 = std::int64_t(blockIdx.y) * 32, c0 = std::int64_t(blockIdx.x) * 32;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const std::int64_t r = r0 + i, c = c0 + threadIdx.x;
    if (r < d && c < d && r <= c) {
      float sum = sums[r * d + c];
      for (std::int64_t j = 1; j < carries; ++j) sum += sums[j * d * d + r * d + c];  // in order
      const T x = from_float<T>(class_sum ? sum + class_sum[r] * class_mean[c] : sum);
      gram[r * d + c] = x;
      tile[threadIdx.x][i] = x;
    }
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const std::int64_t r = c0 + i, c = r0 + threadIdx.x;
    if (r < d && c < r) gram[r * d + c] = tile[i][threadIdx.x];
  }
}

// slab[i][j] = linear_scale[i] e[i][col0 + j] for j < cols (ld: the slab's pitch), rows [0, n), when state[0]. A block
// per row, rows strided by the grid (a thread per element would launch ~10^5 blocks, also where no row took the
// share), 16-byte runs where the rows allow them.
template <class T>
__global__ void scaled_slab_kernel(const T* e, std::int64_t lde, std::int64_t n, std::int64_t col0, std::int64_t cols,
                                   std::int64_t ld, const float* linear_scale, const int* state, T* slab) {
  if (!state[0]) return;
  constexpr int vec = 16 / sizeof(T);
  const bool vectors = (lde | ld | col0 | cols) % vec == 0 && aligned_to(e, 16) && aligned_to(slab, 16);
  for (std::int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const float s = linear_scale[row];
    const T* from = e + row * lde + col0;
    T* to = slab + row * ld;
    if (vectors) {
      for (std::int64_t j = vec * std::int64_t(threadIdx.x); j < cols; j += vec * std::int64_t(blockDim.x)) {
        uint4 raw = *reinterpret_cast<const uint4*>(from + j);
        T* x = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int k = 0; k < vec; ++k) x[k] = from_float<T>(s * to_float(x[k]));
        *reinterpret_cast<uint4*>(to + j) = raw;
      }
    } else {
      for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) to[j] = from_float<T>(s * to_float(from[j]));
    }
  }
}

// Whether a row's one-hot term is added after the walk: it took a baseline, or its target is apart (lone_targets.cuh).
__device__ __forceinline__ bool onehots_apart(const int* state) { return state[0] || state[4]; }

// The rows of each class whose one-hot term is added after the walk (uniform_baseline_buffers::class_rows), for the
// rows [0, n) of a walk (from row0), when a row took a baseline or has its target apart (state[0], state[4]): counted
// per class, offsets by one block's scan, placed, then each class's rows sorted into row order, so that the sums do
// not depend on timing.
// class_offsets and class_fill start at 0.
template <class = void>
__global__ void class_count_kernel(const float* target_scale, const std::int32_t* target_class, std::int64_t n,
                                   std::int32_t* class_offsets, const int* state) {
  const std::int64_t row = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (!onehots_apart(state) || row >= n || target_scale[row] == 0.f) return;
  atomicAdd(class_offsets + target_class[row], 1);
}

// class_offsets[0 .. v] = the exclusive scan of the counts it holds (v + 1 entries: the last is the total), by one
// block in tiles of Threads x Items entries, each loaded and stored coalesced and scanned on top of the tiles before.
template <int Threads, int Items>
__global__ void __launch_bounds__(Threads) class_offsets_kernel(std::int32_t* class_offsets, std::int64_t v,
                                                                const int* state) {
  if (!onehots_apart(state)) return;
  using load = cub::BlockLoad<std::int32_t, Threads, Items, cub::BLOCK_LOAD_TRANSPOSE>;
  using store = cub::BlockStore<std::int32_t, Threads, Items, cub::BLOCK_STORE_TRANSPOSE>;
  using scan = cub::BlockScan<std::int32_t, Threads>;
  __shared__ union {
    typename load::TempStorage load;
    typename store::TempStorage store;
    typename scan::TempStorage scan;
  } tmp;
  constexpr std::int64_t tile = std::int64_t(Threads) * Items;
  std::int32_t before = 0;  // the counts of the tiles before
  for (std::int64_t first = 0; first <= v; first += tile) {
    const int valid = int(v + 1 - first < tile ? v + 1 - first : tile);
    std::int32_t x[Items];
    load(tmp.load).Load(class_offsets + first, x, valid, 0);
    __syncthreads();
    std::int32_t total = 0;
    scan(tmp.scan).ExclusiveSum(x, x, total);
#pragma unroll
    for (int i = 0; i < Items; ++i) x[i] += before;
    __syncthreads();
    store(tmp.store).Store(class_offsets + first, x, valid);
    __syncthreads();
    before += total;
  }
}

template <class = void>
__global__ void class_place_kernel(const float* target_scale, const std::int32_t* target_class, std::int64_t n,
                                   std::int64_t row0, const std::int32_t* class_offsets, std::int32_t* class_fill,
                                   std::int32_t* class_rows, const int* state) {
  const std::int64_t row = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (!onehots_apart(state) || row >= n || target_scale[row] == 0.f) return;
  const std::int32_t c = target_class[row];
  class_rows[class_offsets[c] + atomicAdd(class_fill + c, 1)] = std::int32_t(row0 + row);
}

template <class = void>
__global__ void class_sort_kernel(const std::int32_t* class_offsets, std::int64_t v, std::int32_t* class_rows,
                                  const int* state) {
  const std::int64_t c = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (!onehots_apart(state) || c >= v) return;
  const std::int32_t lo = class_offsets[c], hi = class_offsets[c + 1];
  for (std::int32_t i = lo + 1; i < hi; ++i) {  // insertion sort: a class has few rows
    const std::int32_t r = class_rows[i];
    std::int32_t j = i;
    for (; j > lo && class_rows[j - 1] > r; --j) class_rows[j] = class_rows[j - 1];
    class_rows[j] = r;
  }
}

// The one-hot terms left to after the walk (uniform_baseline_buffers::target_scale), added to the gradients as
// written once the share's products, if any, are done: dE row i -= target_scale[i] c_(target_class[i]) (a warp per
// row), and dC row y -= the sum of target_scale[i] e_i over class y's rows in row order (class_rows; a warp per
// class). Each lane takes runs of 4 columns (one 8- or 16-byte access per operand) where every row allows them.
// Whether runs of 4 fit every row: d and the pitches multiples of 4, the bases aligned to a run.
template <class A, class B>
__device__ __forceinline__ bool runs_of_4(const A* a, std::int64_t lda, const B* b, std::int64_t ldb, std::int64_t d) {
  return (d | lda | ldb) % 4 == 0 && aligned_to(a, 4 * sizeof(A)) && aligned_to(b, 4 * sizeof(B));
}

template <class T, class G>
__global__ void onehot_rows_kernel(const float* target_scale, const std::int32_t* target_class, std::int64_t n,
                                   const T* c, std::int64_t ldc, std::int64_t d, G* de, std::int64_t ld,
                                   const int* state) {
  if (!onehots_apart(state)) return;
  const std::int64_t row = (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (row >= n || target_scale[row] == 0.f) return;
  const float t = -target_scale[row];
  const T* cy = c + std::int64_t(target_class[row]) * ldc;
  G* out = de + row * ld;
  const auto add = [&](auto width) {
    constexpr int w = decltype(width)::value;
    for (std::int64_t k = w * (threadIdx.x % 32); k < d; k += 32 * w) {
      float g[w], x[w];
      load_run<w>(out + k, g);
      load_run<w>(cy + k, x);
#pragma unroll
      for (int q = 0; q < w; ++q) g[q] += t * x[q];
      store_run<w>(out + k, g);
    }
  };
  if (runs_of_4(c, ldc, de, ld, d)) add(std::integral_constant<int, 4>{});
  else add(std::integral_constant<int, 1>{});
}

template <class T, class G>
__global__ void onehot_classes_kernel(const float* target_scale, const std::int32_t* class_offsets,
                                      const std::int32_t* class_rows, std::int64_t v, const T* e, std::int64_t lde,
                                      std::int64_t d, G* dc, std::int64_t ld, const int* state) {
  if (!onehots_apart(state)) return;
  const std::int64_t cls = (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (cls >= v) return;
  const std::int32_t lo = class_offsets[cls], hi = class_offsets[cls + 1];
  if (lo == hi) return;
  G* out = dc + cls * ld;
  const auto add = [&](auto width) {
    constexpr int w = decltype(width)::value;
    for (std::int64_t k = w * (threadIdx.x % 32); k < d; k += 32 * w) {
      float s[w] = {}, x[w];
      for (std::int32_t i = lo; i < hi; ++i) {
        const std::int64_t row = class_rows[i];
        const float t = target_scale[row];
        load_run<w>(e + row * lde + k, x);
#pragma unroll
        for (int q = 0; q < w; ++q) s[q] -= t * x[q];
      }
      float g[w];
      load_run<w>(out + k, g);
#pragma unroll
      for (int q = 0; q < w; ++q) g[q] += s[q];
      store_run<w>(out + k, g);
    }
  };
  if (runs_of_4(e, lde, dc, ld, d)) add(std::integral_constant<int, 4>{});
  else add(std::integral_constant<int, 1>{});
}

}  // namespace cce::detail
