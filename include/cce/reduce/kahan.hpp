// Compensated (Kahan-Babuska / Neumaier) summation: the running error term recovers the low bits that a plain
// fp32 sum drops when adding many small values to a large one.
#pragma once

#include <cce/config.hpp>

namespace cce {

struct kahan_sum {
  float sum = 0.f;
  float compensation = 0.f;

  CCE_HOST_DEVICE void add(float x) {
    const float t = sum + x;
    if (t - t != 0.f) {  // inf or NaN: nothing to recover, and (sum - t) would turn an infinite sum into NaN
      sum = t;
      return;
    }
    // Neumaier: compensate with whichever operand lost bits.
    if ((sum >= 0 ? sum : -sum) >= (x >= 0 ? x : -x)) {
      compensation += (sum - t) + x;
    } else {
      compensation += (x - t) + sum;
    }
    // Fold the representable part of the compensation into the sum: the compensation stays within about an ulp
    // of the sum, so its own rounding stays negligible however many addends are lost in a row.
    const float s = t + compensation;
    compensation -= s - t;
    sum = s;
  }
  CCE_HOST_DEVICE void add(kahan_sum other) {
    add(other.sum);
    compensation += other.compensation;
  }
  CCE_HOST_DEVICE float value() const { return sum + compensation; }
};

// Plain accumulator with the same interface, so accumulation is a template choice.
struct plain_sum {
  float sum = 0.f;
  CCE_HOST_DEVICE void add(float x) { sum += x; }
  CCE_HOST_DEVICE void add(plain_sum other) { sum += other.sum; }
  CCE_HOST_DEVICE float value() const { return sum; }
};

}  // namespace cce
