// Warp-level exchange of the epilogue's per-row and per-column values. Fixed butterfly patterns, so results are
// independent of scheduling (deterministic).
#pragma once

#include <cce/detail/math.hpp>
#include <cce/epilogue/row_partial.hpp>

namespace cce::detail {

__device__ __forceinline__ float shuffle_xor(float x, int mask) { return __shfl_xor_sync(0xffffffffu, x, mask); }

// The smoothing sum and the argmax travel only when the call computes them (warp-uniform flags).
__device__ __forceinline__ row_partial shuffle_xor(const row_partial& p, int mask, bool smoothing, bool argmax) {
  row_partial q;
  q.softmax.max = shuffle_xor(p.softmax.max, mask);
  q.softmax.sum_exp = shuffle_xor(p.softmax.sum_exp, mask);
  q.softmax.sum_exp_z = shuffle_xor(p.softmax.sum_exp_z, mask);
  if (smoothing) q.weighted_logit_sum = shuffle_xor(p.weighted_logit_sum, mask);
  if (argmax) {
    q.argmax_value = shuffle_xor(p.argmax_value, mask);
    q.argmax_index = __shfl_xor_sync(0xffffffffu, p.argmax_index, mask);
  }
  return q;
}

__device__ __forceinline__ float warp_max_all(float x) {
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) x = max_f(x, shuffle_xor(x, mask));
  return x;
}

}  // namespace cce::detail
