// Running argmax with torch's tie rule (the first index wins) and NaN treated as the largest value.
#pragma once

#include <cstdint>

#include <cce/detail/math.hpp>

namespace cce {

struct argmax_state {
  float value = -detail::inf_f();
  std::int64_t index = -1;
};

CCE_HOST_DEVICE bool argmax_better(float a, std::int64_t ia, float b, std::int64_t ib) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a != b) return a > b;
  return ia >= 0 && (ib < 0 || ia < ib);
}

CCE_HOST_DEVICE argmax_state argmax_merge(argmax_state a, argmax_state b) {
  return argmax_better(a.value, a.index, b.value, b.index) ? a : b;
}

CCE_HOST_DEVICE argmax_state argmax_push(argmax_state s, float z, std::int64_t index) {
  return argmax_merge(s, argmax_state{z, index});
}

}  // namespace cce
