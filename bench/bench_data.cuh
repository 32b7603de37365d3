// The benchmark data of shared/bench-spec.md, generated on the device: the shapes, the three data regimes
// (peaked, lm-like, uniform) and one problem's inputs. Shared by cce_bench and the tuner's candidate program.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

namespace cce_bench {

#define CHECK_CUDA(x)                                                                   \
  do {                                                                                  \
    cudaError_t e_ = (x);                                                               \
    if (e_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

struct shape {
  const char* name;
  std::int64_t n, d, v;
  float softcap;
};

// shared/bench-spec.md, "Shapes".
const shape kShapes[] = {
    {"gemma2", 8192, 2304, 256000, 0.f},    {"gemma2-softcap", 8192, 2304, 256000, 30.f},
    {"llama3", 8192, 4096, 128256, 0.f},    {"mistral-nemo", 8192, 5120, 131072, 0.f},
    {"phi3.5", 8192, 3072, 32064, 0.f},     {"qwen2.5", 8192, 3584, 152064, 0.f},
    {"gpt2", 8192, 768, 50304, 30.f},       {"gpt2-64k", 65536, 768, 50304, 30.f},
    {"gemma2-64k", 65536, 2304, 256000, 0.f},
};
const char* kRegimes[] = {"peaked", "lm-like", "uniform"};

// Counter-based normal numbers, so inputs of any size are generated on the device.
__device__ inline float hash_normal(std::uint64_t seed, std::uint64_t i) {
  auto mix = [](std::uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
  };
  const std::uint64_t a = mix(seed * 0x9e3779b97f4a7c15ULL + 2 * i), b = mix(seed * 0x9e3779b97f4a7c15ULL + 2 * i + 1);
  const float u1 = (float(a >> 40) + 1.f) / 16777217.f, u2 = float(b >> 40) / 16777216.f;
  return sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
}

template <class T>
__device__ inline T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) return __float2half(x);
  else return __float2bfloat16(x);
}

// The data regimes of shared/bench-spec.md. targets are uniform in [0, V).
template <class T>
__global__ void fill_classifier(T* c, std::int64_t v, std::int64_t d, int regime) {
  const std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= v * d) return;
  const float x = hash_normal(1, i);
  const float val = regime == 0 ? x * rsqrtf(sqrtf(float(d))) : regime == 1 ? 2.f * x * rsqrtf(float(d)) : 0.01f * x;
  c[i] = from_float<T>(val);
}
template <class T>
__global__ void fill_embeddings(T* e, const T* c, const std::int64_t* y, std::int64_t n,
                                std::int64_t d, std::int64_t v, int regime) {
  const std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * d) return;
  const std::int64_t row = i / d, k = i % d;
  const float x = hash_normal(2, i);
  float val;
  if (regime == 0) val = x * rsqrtf(sqrtf(float(d)));
  else if (regime == 1) val = x + 1.5f * float(c[y[row] * d + k]);
  else val = 0.01f * x;
  e[i] = from_float<T>(val);
}
template <class T>
__global__ void copy_peaked_rows(T* c, const T* e, std::int64_t m, std::int64_t d) {
  const std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < m * d) c[i] = e[i];  // W[:m] = x[:m]
}
__global__ void fill_targets(std::int64_t* y, std::int64_t n, std::int64_t v) {
  const std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  std::uint64_t x = std::uint64_t(i) * 0x9e3779b97f4a7c15ULL + 0x632be59bd9b4e019ULL;
  x ^= x >> 31;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 29;
  if (i < n) y[i] = std::int64_t(x % std::uint64_t(v));
}

inline unsigned blocks(std::int64_t n) { return unsigned((n + 255) / 256); }

template <class T>
struct device_buffer {
  T* ptr = nullptr;
  std::size_t count = 0;
  explicit device_buffer(std::size_t n) : count(n) {
    if (n) CHECK_CUDA(cudaMalloc(&ptr, n * sizeof(T)));
  }
  ~device_buffer() { cudaFree(ptr); }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
};

// One problem's inputs, generated once per (shape, regime) and reused by every method.
template <class T = __nv_bfloat16>
struct inputs {
  shape s;
  int regime;
  device_buffer<T> e, c;
  device_buffer<std::int64_t> y;
  inputs(const shape& sh, int r)
      : s(sh), regime(r), e(std::size_t(sh.n * sh.d)), c(std::size_t(sh.v * sh.d)), y(std::size_t(sh.n)) {
    fill_targets<<<blocks(s.n), 256>>>(y.ptr, s.n, s.v);
    fill_classifier<<<blocks(s.v * s.d), 256>>>(c.ptr, s.v, s.d, regime);
    fill_embeddings<<<blocks(s.n * s.d), 256>>>(e.ptr, c.ptr, y.ptr, s.n, s.d, s.v, regime);
    if (regime == 0) copy_peaked_rows<<<blocks(std::min(s.n, s.v) * s.d), 256>>>(c.ptr, e.ptr, std::min(s.n, s.v), s.d);
    CHECK_CUDA(cudaDeviceSynchronize());
  }
};

}  // namespace cce_bench
