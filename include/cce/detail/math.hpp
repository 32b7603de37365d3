// Scalar math that compiles identically for host and device (no intrinsics), so CPU tests exercise kernel code.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include <cce/config.hpp>

namespace cce::detail {

constexpr float log2e = 1.4426950408889634f;
constexpr float ln2 = 0.6931471805599453f;

CCE_HOST_DEVICE constexpr float inf_f() { return __builtin_huge_valf(); }
CCE_HOST_DEVICE constexpr float nan_f() { return __builtin_nanf(""); }

CCE_HOST_DEVICE float max_f(float a, float b) {
  // NaN wins, so a NaN logit poisons its row as it does in torch.
  return (a != a) ? a : ((b != b) ? b : (a > b ? a : b));
}
CCE_HOST_DEVICE float min_f(float a, float b) { return (a != a) ? a : ((b != b) ? b : (a < b ? a : b)); }
CCE_HOST_DEVICE float exp_f(float x) { return std::exp(x); }
CCE_HOST_DEVICE float log_f(float x) { return std::log(x); }
CCE_HOST_DEVICE float log1p_f(float x) { return std::log1p(x); }
CCE_HOST_DEVICE float tanh_f(float x) { return std::tanh(x); }
CCE_HOST_DEVICE float sqrt_f(float x) { return std::sqrt(x); }
CCE_HOST_DEVICE float abs_f(float x) { return std::fabs(x); }

CCE_HOST_DEVICE bool aligned_to(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

CCE_HOST_DEVICE constexpr std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }
CCE_HOST_DEVICE constexpr std::int64_t round_up(std::int64_t a, std::int64_t b) { return ceil_div(a, b) * b; }

}  // namespace cce::detail
