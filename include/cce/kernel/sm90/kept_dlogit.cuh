// loss_and_grad's backward step 1 when the forward kept the logits (dispatch/plan.hpp, `kept`): each logit the
// logit-keeping forward stored (fp16, relative to its tile row's max: forward.cuh) becomes draw = dz * dz/draw in T,
// in place. The contract of the dlogit kernels (kernel/portable/dlogit.cuh) without their products: the filter's
// tile flags come first, from portable/dlogit.cuh's tile_flags_kernel (which also zeroes the bias sums of skipped
// tiles), so that this kernel reads only live tiles and starts loading at once; it writes their bias gradient's
// column sums per row tile. Plain CUDA, memory-bound: one CTA per 128 x 128 filter tile, each thread 8 adjacent
// classes (16 bytes) of 8 rows.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include <cce/detail/element_type.hpp>
#include <cce/dispatch/plan.hpp>
#include <cce/epilogue/logit_transform.hpp>
#include <cce/kernel/portable/fast_math.cuh>
#include <cce/tile/tile_grid.hpp>

namespace cce::detail::sm90 {

template <class T>
struct kept_dlogit_params {
  T* dz = nullptr;                         // rows x ld: holds the kept logits (fp16) on entry
  std::int64_t ld = 0;                     // a multiple of the tile width
  const float* ref = nullptr;              // rows x ref_ld: what each 256-class tile's values are relative to
  std::int64_t ref_ld = 0;
  const row_coefficients* coef = nullptr;  // the block's rows
  const float* class_weights = nullptr;    // of the problem's classes
  logit_transform transform{};
  tile::tile_grid grid;                    // the block: rows x V in 128 x 128 tiles
  const std::uint8_t* active = nullptr;    // (rows / 128) x (ld / 128): the filter's flags
  float* dbias_partial = nullptr;          // row_tiles x ld, or null
};

inline constexpr int kept_dlogit_threads = 256;

// Three CTAs per SM (80 registers): more loads in flight than two of 108 registers gave (0.97 against 1.09 ms for a
// gemma2 block).
template <class T>
__global__ void __launch_bounds__(kept_dlogit_threads, 3)
    kept_dlogit_kernel(const __grid_constant__ kept_dlogit_params<T> prm) {
  static_assert(sizeof(T) == sizeof(__half), "draw overwrites the fp16 logit it comes from");
  constexpr int tile = 128, vec = 8, lanes_per_row = tile / vec, rows_per_step = kept_dlogit_threads / lanes_per_row;
  const tile::tile_grid& g = prm.grid;
  const std::int64_t rt = blockIdx.x, ct = blockIdx.y;
  if (!prm.active[rt * (prm.ld / tile) + ct]) return;

  const int lane_row = threadIdx.x / lanes_per_row, lane_col = vec * (threadIdx.x % lanes_per_row);
  const std::int64_t col0 = ct * tile + lane_col;
  const logit_derivative derivative(prm.transform);
  float col_sum[vec] = {};
  // Every row's 16 bytes are loaded before any is converted: eight loads in flight per thread. The tile rows'
  // constants go through shared memory, loaded beside them: read from global memory inside the loop, each row's
  // would wait for the previous row's store (which might alias them, for all the compiler knows).
  constexpr int steps = tile / rows_per_step;
  static_assert(plan::kept_ref_cols % tile == 0, "one stored reference per row of the tile");
  __shared__ row_coefficients tile_coef[tile];
  __shared__ float tile_ref[tile];
  if (threadIdx.x < tile && rt * tile + threadIdx.x < g.rows) {
    const std::int64_t row = rt * tile + threadIdx.x;
    tile_coef[threadIdx.x] = prm.coef[row];
    tile_ref[threadIdx.x] = prm.ref[row * prm.ref_ld + ct * tile / plan::kept_ref_cols];
  }
  const std::int64_t row0 = rt * tile + lane_row;
  uint4 in[steps] = {};
#pragma unroll
  for (int i = 0; i < steps; ++i) {
    const std::int64_t row = row0 + rows_per_step * i;
    if (row < g.rows) in[i] = *reinterpret_cast<const uint4*>(prm.dz + row * prm.ld + col0);
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < steps; ++i) {
    const std::int64_t row = row0 + rows_per_step * i;
    if (row >= g.rows) break;
    const row_coefficients rc = tile_coef[lane_row + rows_per_step * i];
    const float ref = tile_ref[lane_row + rows_per_step * i];
    const auto* logit = reinterpret_cast<const __half*>(&in[i]);
    uint4 out;
    auto* draw = reinterpret_cast<T*>(&out);
    // The common run: a row with gradient, no target among the 8 classes, all inside the vocabulary, no class
    // weights. Then draw = (a p + b) f(z) + c + l z with a softcap (f its factor), a p + b + l z without, with the
    // row's coefficients (dlogit_coefficients::non_target, the derivative's factor 1/T in them). The general form below
    // has several times the instructions, enough to bound this pass by them rather than by memory
    // (docs/performance.md).
    const bool plain =
        rc.kept && !prm.class_weights && (rc.target < col0 || rc.target >= col0 + vec) && col0 + vec <= g.cols;
    const auto convert_plain = [&](auto capped_constant) {
      constexpr bool capped = decltype(capped_constant)::value;
      const dlogit_coefficients::affine af = rc.dz.non_target(derivative.inv_temperature, capped);
#pragma unroll
      for (int e = 0; e < vec; ++e) {
        const float z = ref + __half2float(logit[e]);
        float d = fmaf(af.a, exp2_approx((z - rc.lse) * log2e), af.b);
        if constexpr (capped) d = fmaf(d, derivative.softcap_factor(z), af.c);
        d = fmaf(af.l, z, d);
        col_sum[e] += d;
        draw[e] = from_float<T>(d);
      }
    };
    if (plain && prm.transform.softcap > 0.f) {
      convert_plain(std::true_type{});
    } else if (plain) {
      convert_plain(std::false_type{});
    } else {
#pragma unroll
      for (int e = 0; e < vec; ++e) {
        const float z = ref + __half2float(logit[e]);
        const float p = exp2_approx((z - rc.lse) * log2e);
        const float w = prm.class_weights && col0 + e < g.cols ? prm.class_weights[col0 + e] : 1.f;  // L1 hits
        const float d = rc.dz.draw(p, col0 + e == rc.target, w, derivative(z), derivative.inv_temperature, z);
        const float kept = rc.kept && col0 + e < g.cols ? d : 0.f;  // past V inside the tile: 0 (the GEMMs read it)
        col_sum[e] += kept;
        draw[e] = from_float<T>(kept);
      }
    }
    // One 16-byte store: a plain assignment was split into four (__stcg also leaves the value out of L1).
    __stcg(reinterpret_cast<uint4*>(prm.dz + row * prm.ld + col0), out);
  }

  if (prm.dbias_partial) {  // column sums of the row groups, in a fixed order
    float* dbias = prm.dbias_partial + rt * prm.ld + ct * tile;
    __shared__ float staged[rows_per_step][tile];
#pragma unroll
    for (int e = 0; e < vec; ++e) staged[lane_row][lane_col + e] = col_sum[e];
    __syncthreads();
    for (int c = threadIdx.x; c < tile; c += kept_dlogit_threads) {
      float s = 0.f;
      for (int r = 0; r < rows_per_step; ++r) s += staged[r][c];
      dbias[c] = s;
    }
  }
}

}  // namespace cce::detail::sm90
