// Element types the library computes on (float, __half, __nv_bfloat16): conversions and rounding constants, usable
// from host code compiled without nvcc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include <cce/config.hpp>

namespace cce::detail {

template <class T>
struct element_traits;

template <>
struct element_traits<float> {
  static constexpr const char* name = "fp32";
  static constexpr float epsilon = 1.1920928955078125e-7f;  // 2^-23
  static CCE_HOST_DEVICE float to_float(float x) { return x; }
  static CCE_HOST_DEVICE float from_float(float x) { return x; }
};

template <>
struct element_traits<__half> {
  static constexpr const char* name = "fp16";
  static constexpr float epsilon = 9.765625e-4f;  // 2^-10
  static CCE_HOST_DEVICE float to_float(__half x) { return __half2float(x); }
  static CCE_HOST_DEVICE __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct element_traits<__nv_bfloat16> {
  static constexpr const char* name = "bf16";
  static constexpr float epsilon = 7.8125e-3f;  // 2^-7
  static CCE_HOST_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static CCE_HOST_DEVICE __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <class T>
CCE_HOST_DEVICE float to_float(T x) { return element_traits<T>::to_float(x); }
template <class T>
CCE_HOST_DEVICE T from_float(float x) { return element_traits<T>::from_float(x); }

// Unit roundoff u(T) = epsilon / 2, with the 1e-6 floor the tests use for fp32.
template <class T>
constexpr float unit_roundoff() noexcept {
  return std::is_same_v<T, float> ? 1e-6f : element_traits<T>::epsilon / 2;
}

template <class T>
inline constexpr bool is_supported_element_v =
    std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

}  // namespace cce::detail
