// Special-function-unit forms of the epilogues' transcendental functions. Unrolled over a tile, the libm forms
// (expf, tanhf) cost many times the instructions and overflow the instruction cache.
#pragma once

#include <cce/detail/math.hpp>
#include <cce/epilogue/logit_transform.hpp>

namespace cce::detail {

// 2^x (relative error ~2^-22); the epilogues fold log2(e) into their arguments.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// z = softcap(raw) / T with a softcap k > 0, in straight-line code: tanh(y) = sign(y) (1 - e) / (1 + e) with
// e = 2^(-2 log2(e) |y|), one ex2 and one approximate division per logit (absolute error ~1e-7, against ~1 ulp
// for tanhf).
struct softcap_approx {
  float scale, k;
  __device__ explicit softcap_approx(const logit_transform& t)
      : scale(t.softcap * t.inv_temperature), k(-2.f * log2e / t.softcap) {}
  __device__ __forceinline__ float operator()(float raw) const {
    const float e = exp2_approx(k * fabsf(raw));
    return copysignf(scale * __fdividef(1.f - e, 1.f + e), raw);
  }
};

// dz/draw from z (logit_transform::derivative_from_logit) without a branch: (1 - c z^2) / T with c = 0 without
// softcap, and exactly 0 where the softcap saturates (|z| = k / T, as softcap_approx produces it), so that an
// infinite input meets a zero gradient as it does in the reference.
struct logit_derivative {
  float c = 0.f, inv_temperature = 1.f, saturated = detail::inf_f();
  __device__ explicit logit_derivative(const logit_transform& t) : inv_temperature(t.inv_temperature) {
    if (t.softcap > 0.f) {
      saturated = t.softcap * t.inv_temperature;
      c = 1.f / (saturated * saturated);
    }
  }
  __device__ __forceinline__ float operator()(float z) const {
    return fabsf(z) >= saturated ? 0.f : fmaf(-c * z, z, 1.f) * inv_temperature;
  }
};

}  // namespace cce::detail
