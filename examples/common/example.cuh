// What examples 03 and 04 share, so each program reads as its own story: error checks, memory that lives on the
// GPU or (without one) on the host, an element-wise launcher that runs the same functor as a CUDA kernel or as a
// host loop, Adam, and one loss object over cce::linear_cross_entropy (GPU) and cce::host::tiled_executor (CPU).
// Because the GPU and CPU runs go through the same functors, running an example on a machine without a GPU
// exercises the code its GPU run executes. Not part of the library.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

#include <cce/cce.cuh>
#include <cce/host/tiled_executor.hpp>

namespace example {

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s failed: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

inline void check(cce::status s, const char* what) {
  if (s != cce::status::success) {
    std::fprintf(stderr, "%s: %s\n", what, cce::to_string(s));
    std::exit(1);
  }
}

// True when a CUDA device is visible (the query leaves an error behind on a machine without one).
inline bool gpu_available() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) return true;
  cudaGetLastError();
  return false;
}

// n elements of T on the device, or in 256-byte aligned host memory (the alignment cce asks of its buffers).
template <class T>
class buffer {
 public:
  buffer() = default;
  buffer(bool gpu, std::size_t n) : gpu_(gpu), n_(n) {
    if (n == 0) return;
    if (gpu) {
      check_cuda(cudaMalloc(&p_, bytes()), "cudaMalloc");
    } else {
      p_ = static_cast<T*>(::operator new (bytes(), std::align_val_t{256}));
    }
    zero();
  }
  buffer(const buffer&) = delete;
  buffer& operator=(const buffer&) = delete;
  buffer(buffer&& o) noexcept { *this = std::move(o); }
  buffer& operator=(buffer&& o) noexcept {
    std::swap(gpu_, o.gpu_);
    std::swap(n_, o.n_);
    std::swap(p_, o.p_);
    return *this;
  }
  ~buffer() {
    if (p_ == nullptr) return;
    if (gpu_) {
      cudaFree(p_);
    } else {
      ::operator delete (p_, std::align_val_t{256});
    }
  }

  T* get() const { return p_; }
  std::size_t size() const { return n_; }
  std::size_t bytes() const { return n_ * sizeof(T); }

  void zero() {
    if (gpu_) {
      check_cuda(cudaMemset(p_, 0, bytes()), "cudaMemset");
    } else {
      std::memset(static_cast<void*>(p_), 0, bytes());
    }
  }
  void upload(const std::vector<T>& h) {
    const std::size_t b = std::min(h.size(), n_) * sizeof(T);
    if (gpu_) {
      check_cuda(cudaMemcpy(p_, h.data(), b, cudaMemcpyHostToDevice), "cudaMemcpy");
    } else {
      std::memcpy(static_cast<void*>(p_), h.data(), b);
    }
  }
  std::vector<T> download() const {
    std::vector<T> h(n_);
    if (gpu_) {
      check_cuda(cudaMemcpy(h.data(), p_, bytes(), cudaMemcpyDeviceToHost), "cudaMemcpy");
    } else {
      std::memcpy(static_cast<void*>(h.data()), p_, bytes());
    }
    return h;
  }

 private:
  bool gpu_ = false;
  std::size_t n_ = 0;
  T* p_ = nullptr;
};

template <class F>
__global__ void for_each_kernel(std::int64_t n, F f) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) f(i);
}

// f(i) for i in [0, n): a grid-stride kernel on the default stream, or a host loop. F is a functor with a
// `__host__ __device__ void operator()(std::int64_t) const`.
template <class F>
void for_each(bool gpu, std::int64_t n, const F& f) {
  if (n <= 0) return;
  if (!gpu) {
    for (std::int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  constexpr int threads = 256;
  const auto blocks = unsigned(std::min<std::int64_t>((n + threads - 1) / threads, std::int64_t(1) << 16));
  for_each_kernel<<<blocks, threads>>>(n, f);
  check_cuda(cudaGetLastError(), "kernel launch");
}

// *p += x from many threads at once on the device (several rows may share an embedding row); plain on the host.
__host__ __device__ inline void add_to(float* p, float x) {
#ifdef __CUDA_ARCH__
  atomicAdd(p, x);
#else
  *p += x;
#endif
}

// One Adam step on fp32 master weights w with gradient g; refreshes the bf16 copy cce reads (when given) and,
// when asked, clears the gradient for the next step's accumulation.
struct adam_update {
  float *w, *g, *m, *v;
  __nv_bfloat16* w16;
  float lr, beta1, beta2, eps, bias1, bias2;
  bool clear_grad;

  __host__ __device__ void operator()(std::int64_t i) const {
    const float gi = g[i];
    const float mi = beta1 * m[i] + (1.f - beta1) * gi, vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float wi = w[i] - lr * (mi / bias1) / (std::sqrt(vi / bias2) + eps);
    w[i] = wi;
    if (w16) w16[i] = __float2bfloat16(wi);
    if (clear_grad) g[i] = 0.f;
  }
};

// Adam's state (moments, step count) for n parameters.
class adam {
 public:
  adam(bool gpu, std::size_t n, float lr) : gpu_(gpu), m_(gpu, n), v_(gpu, n), lr_(lr) {}

  void step(float* w, float* g, __nv_bfloat16* w16, bool clear_grad) {
    ++t_;
    const float b1 = 0.9f, b2 = 0.999f;
    const float bias1 = 1.f - std::pow(b1, float(t_)), bias2 = 1.f - std::pow(b2, float(t_));
    const adam_update u{w, g, m_.get(), v_.get(), w16, lr_, b1, b2, 1e-8f, bias1, bias2, clear_grad};
    for_each(gpu_, std::int64_t(m_.size()), u);
  }

 private:
  bool gpu_;
  buffer<float> m_, v_;
  float lr_;
  int t_ = 0;
};

// cce's loss on the GPU (the library's functor) or on the CPU (the tiled executor: the same blockwise algorithm,
// plan and buffers, with host pointers), behind one interface.
template <class T>
class loss_fn {
 public:
  loss_fn(bool gpu, const cce::options& opts) : gpu_(gpu), op_(opts), cpu_(opts, 64, 128) {
    if (gpu) check(cce::current_device(dev_), "reading the device");
  }

  bool gpu() const { return gpu_; }
  const cce::device_info& device() const { return dev_; }

  std::size_t saved_bytes(const cce::problem<T>& p) const { return gpu_ ? op_.saved_bytes(p) : cpu_.saved_bytes(p); }
  std::size_t workspace_bytes(const cce::problem<T>& p, std::size_t budget = 0) const {
    return gpu_ ? op_.workspace_bytes(p, dev_, budget) : cpu_.workspace_bytes(p, budget);
  }
  cce::backward_mode mode(const cce::problem<T>& p, std::size_t budget) const {
    return gpu_ ? op_.mode(p, dev_, budget) : cpu_.plan_for(p, budget).mode;
  }

  cce::status forward(const cce::problem<T>& p, const cce::forward_outputs& out, void* saved, std::size_t saved_size,
                      void* work, std::size_t work_size) const {
    return gpu_ ? op_.forward(p, out, saved, saved_size, work, work_size)
                : cpu_.forward(p, out, saved, saved_size, work, work_size);
  }
  template <class G>
  cce::status backward(const cce::problem<T>& p, const cce::gradients<G>& grads, const void* saved,
                       std::size_t saved_size, void* work, std::size_t work_size) const {
    return gpu_ ? op_.backward(p, {}, grads, saved, saved_size, work, work_size)
                : cpu_.backward(p, {}, grads, saved, saved_size, work, work_size);
  }

 private:
  bool gpu_;
  cce::device_info dev_{};
  cce::linear_cross_entropy<T> op_;
  cce::host::tiled_executor<T> cpu_;
};

inline const char* to_string(cce::backward_mode m) {
  switch (m) {
    case cce::backward_mode::minimal:
      return "minimal";
    case cce::backward_mode::chunked:
      return "chunked";
    case cce::backward_mode::loss_and_grad:
      return "loss_and_grad";
    default:
      return "automatic";
  }
}

}  // namespace example
