// Device copies for the GPU tests: a typed device buffer, a host problem mirrored on the device, and downloads to
// float for the comparisons of case_check.hpp.
#pragma once

#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <vector>

#include <cce/problem.hpp>
#include "random_problem.hpp"

#define REQUIRE_CUDA(x) REQUIRE((x) == cudaSuccess)

namespace cce::test {

template <class U>
struct device_vector {
  U* ptr = nullptr;
  std::size_t count = 0;
  device_vector() = default;
  explicit device_vector(std::size_t n) : count(n) {
    if (n) REQUIRE_CUDA(cudaMalloc(&ptr, n * sizeof(U)));
  }
  explicit device_vector(const std::vector<U>& host) : device_vector(host.size()) {
    if (count) REQUIRE_CUDA(cudaMemcpy(ptr, host.data(), count * sizeof(U), cudaMemcpyHostToDevice));
  }
  ~device_vector() { cudaFree(ptr); }
  device_vector(const device_vector&) = delete;
  device_vector& operator=(const device_vector&) = delete;
  std::vector<U> download() const {
    std::vector<U> h(count);
    if (count) REQUIRE_CUDA(cudaMemcpy(h.data(), ptr, count * sizeof(U), cudaMemcpyDeviceToHost));
    return h;
  }
};

// A host problem mirrored on the device.
template <class T>
struct device_problem {
  device_vector<T> e, c, bias, a, b;
  device_vector<float> weights;
  device_vector<std::int64_t> t64;
  device_vector<std::int32_t> t32;
  problem<T> p;
  explicit device_problem(const host_problem<T>& h)
      : e(h.e), c(h.c), bias(h.bias), a(h.a), b(h.b), weights(h.weights), t64(h.t64), t32(h.t32), p(h.view()) {
    p.e = e.ptr;
    p.c = c.ptr;
    p.bias = h.cfg.bias ? bias.ptr : nullptr;
    p.class_weights = h.cfg.class_weights ? weights.ptr : nullptr;
    p.targets = h.cfg.int32_targets ? static_cast<const void*>(t32.ptr) : static_cast<const void*>(t64.ptr);
    if (h.cfg.rank) {
      p.lora.a = a.ptr;
      p.lora.b = b.ptr;
    }
  }
};

template <class U>
std::vector<float> to_float_vector(const std::vector<U>& v) {
  std::vector<float> f;
  f.reserve(v.size());
  for (const U& x : v) f.push_back(detail::to_float(x));
  return f;
}

}  // namespace cce::test
