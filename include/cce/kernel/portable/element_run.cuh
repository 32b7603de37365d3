// A run of Width consecutive elements (1 or 4) read into or written from fp32 registers in one access: 16 bytes of
// fp32, 8 of fp16 or bf16. The caller guarantees the alignment of a 4-element run (aligned_to(at, 4 * sizeof(X))).
#pragma once

#include <cuda_runtime.h>

#include <cce/detail/element_type.hpp>

namespace cce::detail {

template <int Width, class X>
__device__ __forceinline__ void load_run(const X* at, float (&x)[Width]) {
  static_assert(Width == 1 || Width == 4, "runs of 1 or 4 elements");
  if constexpr (Width == 1) {
    x[0] = to_float(*at);
  } else if constexpr (sizeof(X) == 4) {
    const float4 v = *reinterpret_cast<const float4*>(at);
    x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(at);
    const X* h = reinterpret_cast<const X*>(&v);
#pragma unroll
    for (int q = 0; q < 4; ++q) x[q] = to_float(h[q]);
  }
}

template <int Width, class X>
__device__ __forceinline__ void store_run(X* at, const float (&x)[Width]) {
  static_assert(Width == 1 || Width == 4, "runs of 1 or 4 elements");
  if constexpr (Width == 1) {
    *at = from_float<X>(x[0]);
  } else if constexpr (sizeof(X) == 4) {
    *reinterpret_cast<float4*>(at) = make_float4(x[0], x[1], x[2], x[3]);
  } else {
    uint2 v;
    X* h = reinterpret_cast<X*>(&v);
#pragma unroll
    for (int q = 0; q < 4; ++q) h[q] = from_float<X>(x[q]);
    *reinterpret_cast<uint2*>(at) = v;
  }
}

}  // namespace cce::detail
