// Warp-level exchange of the epilogue's per-row and per-column values, and a warp's dot product of two rows. Fixed
// butterfly patterns, so results are independent of scheduling (deterministic).
#pragma once

#include <cce/detail/element_type.hpp>
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

// a . b over d elements by a warp, in 16-byte runs where both rows allow them; every lane gets the sum.
template <class T>
__device__ __forceinline__ float warp_dot(const T* a, const T* b, std::int64_t d, int lane) {
  constexpr int vec = 16 / sizeof(T);
  float s = 0.f;
  if (d % vec == 0 && aligned_to(a, 16) && aligned_to(b, 16)) {
#pragma unroll 4
    for (std::int64_t k = vec * lane; k < d; k += 32 * vec) {
      const uint4 x = *reinterpret_cast<const uint4*>(a + k), y = *reinterpret_cast<const uint4*>(b + k);
      const T* xs = reinterpret_cast<const T*>(&x);
      const T* ys = reinterpret_cast<const T*>(&y);
#pragma unroll
      for (int i = 0; i < vec; ++i) s += to_float(xs[i]) * to_float(ys[i]);
    }
  } else {
    for (std::int64_t k = lane; k < d; k += 32) s += to_float(a[k]) * to_float(b[k]);
  }
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) s += shuffle_xor(s, mask);
  return s;
}

}  // namespace cce::detail
