// Per-logit map from the raw product raw = e.c + bias to the logit the softmax sees:
//   z = softcap(raw) / T,   softcap(x) = k tanh(x / k) (identity when k = 0),
// and its derivative dz/draw = s'(raw) / T with s'(x) = 1 - tanh^2(x / k).
#pragma once

#include <cce/detail/math.hpp>

namespace cce {

struct logit_transform {
  float softcap = 0.f;          // k; 0 disables
  float inv_temperature = 1.f;  // 1 / T

  CCE_HOST_DEVICE float operator()(float raw) const {
    const float capped = softcap > 0.f ? softcap * detail::tanh_f(raw / softcap) : raw;
    return capped * inv_temperature;
  }
  // dz/draw at raw.
  CCE_HOST_DEVICE float derivative(float raw) const {
    if (softcap > 0.f) {
      const float t = detail::tanh_f(raw / softcap);
      return (1.f - t * t) * inv_temperature;
    }
    return inv_temperature;
  }
  // dz/draw from z itself, which avoids a second tanh: tanh(raw/k) = z T / k.
  CCE_HOST_DEVICE float derivative_from_logit(float z) const {
    if (softcap > 0.f) {
      const float t = z / (inv_temperature * softcap);
      return (1.f - t * t) * inv_temperature;
    }
    return inv_temperature;
  }
};

}  // namespace cce
