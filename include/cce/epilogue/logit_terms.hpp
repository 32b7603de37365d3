// The per-logit terms added to the tile product before the softmax: bias, the low-rank head's extra columns
// lora_p . B_v (lora_p = scale * E A^T, precomputed in fp32), then softcap and temperature.
#pragma once

#include <cstdint>

#include <cce/detail/element_type.hpp>
#include <cce/epilogue/logit_transform.hpp>
#include <cce/options.hpp>
#include <cce/problem.hpp>

namespace cce {

template <class T>
struct logit_terms {
  const T* bias = nullptr;        // V
  const float* lora_p = nullptr;  // N x rank
  const T* lora_b = nullptr;      // V x rank, leading dimension ldb
  std::int64_t rank = 0;
  std::int64_t ldb = 0;
  logit_transform transform{};

  // raw = acc + bias + lora; returns z.
  CCE_HOST_DEVICE float operator()(float acc, std::int64_t row, std::int64_t col) const {
    return transform(raw(acc, row, col));
  }
  CCE_HOST_DEVICE float raw(float acc, std::int64_t row, std::int64_t col) const {
    if (bias) acc += detail::to_float(bias[col]);
    for (std::int64_t k = 0; k < rank; ++k) acc += lora_p[row * rank + k] * detail::to_float(lora_b[col * ldb + k]);
    return acc;
  }
  CCE_HOST_DEVICE bool has_raw_terms() const { return bias != nullptr || rank > 0; }
};

// The terms of a problem and its options; lora_p = scale * E A^T, computed by the caller when the head has one.
template <class T>
logit_terms<T> make_logit_terms(const problem<T>& p, const options& o, const float* lora_p) {
  logit_terms<T> t;
  t.bias = p.bias;
  t.lora_p = lora_p;
  t.lora_b = p.lora.b;
  t.rank = p.lora.rank;
  t.ldb = p.b_stride();
  t.transform = {o.softcap, 1.f / o.temperature};
  return t;
}

}  // namespace cce
