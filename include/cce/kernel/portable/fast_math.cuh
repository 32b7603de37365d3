// Short forms of the epilogues' transcendental functions, on the special-function unit or the FMA pipe. Unrolled
// over a tile, the libm forms (expf, tanhf) cost many times the instructions and overflow the instruction cache.
#pragma once

#include <cce/detail/math.hpp>
#include <cce/epilogue/logit_transform.hpp>
#include <cce/reduce/online_softmax.hpp>

namespace cce::detail {

// 2^x (relative error ~2^-22); the epilogues fold log2(e) into their arguments.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 1 / x (relative error below 2^-23).
__device__ __forceinline__ float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// min(a, b), NaN when either is (min.NaN: sm_80 and newer).
__device__ __forceinline__ float min_nan(float a, float b) {
  float y;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
}

// 1 / x for x in [1, 2^64] (or NaN), off the special-function unit where an SM has 128 FP32 lanes (sm_86 and newer:
// eight per special-function result per clock; sm_80 has four, and keeps rcp): a first guess from the bits (within
// 5.1 %), one Newton step (error squared: 2.6e-3) and one third-order step r (1 + d + d^2) with d = 1 - x r (error
// cubed), five FFMAs in all; relative error below 7.7e-8 (every float of [1, 2^64) checked), exactly 1 at x = 1. The
// softcap then takes two SFU operations per logit (its exponential and the softmax's) instead of three: the portable
// gpt2 forward 1 % faster, the sm_90a one within the noise (docs/performance.md).
__device__ __forceinline__ float rcp_fma(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 800
  return rcp_approx(x);
#else
  float r = __int_as_float(0x7EF311C3 - __float_as_int(x));
  r = fmaf(r, fmaf(-x, r, 1.f), r);
  const float d = fmaf(-x, r, 1.f);
  return fmaf(r, fmaf(d, d, d), r);
#endif
}

// z = softcap(raw) / T with a softcap k > 0, in straight-line code. With y = raw / k, s = k / T and
// e = 2^(-2 log2(e) y), tanh y = 2 / (1 + e) - 1, so z = 2 s / (1 + e) - s: one ex2, one reciprocal and one FFMA per
// logit (fewer instructions than (1 - e) / (1 + e) s, and the count bounds a small-D forward's epilogue:
// docs/performance.md). Its error is absolute, below 4e-7 s in z (the ex2 and reciprocal approximations, one
// rounding): the relative error grows as ~1e-7 / |y| near 0, far inside what 16-bit inputs carry. With Series (fp32
// inputs, whose path promises fp32 accuracy), tanh|y| = (1 - e) / (1 + e) with e from |y|, and the odd Taylor
// polynomial to y^9 takes over below |y| = 1/4 (truncation below 1e-8): relative error below u(fp32) everywhere,
// for ~8 more FP32 operations.
template <bool Series = false>
struct softcap_approx {
  float scale, k, inv_cap;
  __device__ explicit softcap_approx(const logit_transform& t)
      : scale(t.softcap * t.inv_temperature), k(-2.f * log2e / t.softcap), inv_cap(1.f / t.softcap) {}
  __device__ __forceinline__ float operator()(float raw) const {
    if constexpr (Series) {
      const float e = exp2_approx(k * fabsf(raw));  // in [0, 1]
      const float y = fabsf(raw) * inv_cap, y2 = y * y;
      const float series =
          y * fmaf(y2, fmaf(y2, fmaf(y2, fmaf(y2, 62.f / 2835.f, -17.f / 315.f), 2.f / 15.f), -1.f / 3.f), 1.f);
      return copysignf(scale * (y < 0.25f ? series : __fdividef(1.f - e, 1.f + e)), raw);
    } else {
      return logit(ratio(raw));
    }
  }
  // z = 2 s r - s in two steps (16-bit inputs): r = 1 / (1 + e) in [0, 1], then z.
  __device__ __forceinline__ float ratio(float raw) const {
    // e from raw itself, capped at 2^64 (NaN kept): 0 where the softcap saturates upward, 2^64 downward, so that
    // z = s or -s exactly there.
    const float e = exp2_approx(min_nan(k * raw, 64.f));
    return rcp_fma(1.f + e);
  }
  __device__ __forceinline__ float logit(float r) const { return fmaf(2.f * scale, r, -scale); }
};

// The softmax of softcapped logits (16-bit inputs) against the fixed reference s = k / T, which bounds them
// (|z| < s), in place of the row's max: with z = 2 s r - s (softcap_approx::ratio), exp(z - s) = 2^(c r - c) with
// c = 2 s log2(e), one FFMA and one ex2 per logit and no max pass ahead of the exponentials. Their arguments stay in
// [-c, 0], above the smallest normal float's -126 where s <= 40 (applies): no weight flushes to zero, and fp32 sums
// keep their relative precision at any scale.
struct capped_softmax {
  softcap_approx<> cap;
  float c;
  __device__ explicit capped_softmax(const logit_transform& t) : cap(t), c(2.f * log2e * cap.scale) {}
  __host__ __device__ static bool applies(const logit_transform& t) {
    return t.softcap > 0.f && t.softcap * t.inv_temperature <= 40.f;
  }
  __device__ __forceinline__ float weight(float r) const { return exp2_approx(fmaf(c, r, -c)); }
  // The statistics of sums of w = weight(r) and w r: sum_v exp(z_v - s) z_v = 2 s sum w r - s sum w.
  __device__ __forceinline__ softmax_stats stats(float sum_w, float sum_wr) const {
    return {cap.scale, sum_w, fmaf(2.f * cap.scale, sum_wr, -cap.scale * sum_w)};
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
  __device__ __forceinline__ float operator()(float z) const { return softcap_factor(z) * inv_temperature; }
  // 1 - tanh^2 of the softcap (1 without one): the derivative without its constant factor 1/T.
  __device__ __forceinline__ float softcap_factor(float z) const {
    return fabsf(z) >= saturated ? 0.f : fmaf(-c * z, z, 1.f);
  }
};

}  // namespace cce::detail
