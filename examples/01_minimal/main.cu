// 01_minimal: the loss and gradients of a small Gemma-2-like output layer with cce.
//
// N = 512 tokens, D = 256 hidden, V = 32000 classes, bf16 values generated here. With a GPU the program runs
// cce::linear_cross_entropy on it, times forward and backward with CUDA events and compares with the memory that
// materialised logits would need. The workspace budget is 8 MiB, which selects the `minimal` backward. Without one it runs the same blockwise algorithm on the CPU
// (cce::host::tiled_executor), so the example works anywhere the toolkit is installed.
//
//   cmake -B build -G Ninja && cmake --build build --target 01_minimal && ./build/examples/01_minimal/01_minimal
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include <cce/cce.cuh>
#include <cce/host/tiled_executor.hpp>

namespace {

using bf16 = __nv_bfloat16;
constexpr std::int64_t N = 512, D = 256, V = 32000;
constexpr std::size_t kBudget = std::size_t(8) << 20;  // workspace the caller grants

#define CHECK_CUDA(x)                                                                          \
  do {                                                                                         \
    const cudaError_t e_ = (x);                                                                \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s failed: %s\n", #x, cudaGetErrorString(e_));                     \
      std::exit(1);                                                                            \
    }                                                                                          \
  } while (0)

void check(cce::status s, const char* what) {
  if (s != cce::status::success) {
    std::fprintf(stderr, "%s: %s\n", what, cce::to_string(s));
    std::exit(1);
  }
}

struct inputs {
  std::vector<bf16> e, c;
  std::vector<std::int64_t> targets;
};

// Embeddings that point towards their target's classifier row, as a trained model's would.
inputs make_inputs() {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.f, 1.f);
  inputs in;
  std::vector<float> c(std::size_t(V * D));
  for (float& x : c) x = 2.f * normal(rng) / 16.f;  // 2 / sqrt(D)
  for (float x : c) in.c.push_back(__float2bfloat16(x));
  for (std::int64_t i = 0; i < N; ++i) {
    const std::int64_t y = std::int64_t(rng() % V);
    in.targets.push_back(i % 64 == 63 ? -100 : y);  // a few ignored positions (ignore_index = -100)
    for (std::int64_t k = 0; k < D; ++k) in.e.push_back(__float2bfloat16(normal(rng) + 1.5f * c[std::size_t(y * D + k)]));
  }
  return in;
}

int run_on_gpu(const inputs& in) {
  bf16 *e, *c, *de, *dc;
  std::int64_t* y;
  float* loss;
  CHECK_CUDA(cudaMalloc(&e, in.e.size() * sizeof(bf16)));
  CHECK_CUDA(cudaMalloc(&c, in.c.size() * sizeof(bf16)));
  CHECK_CUDA(cudaMalloc(&de, in.e.size() * sizeof(bf16)));
  CHECK_CUDA(cudaMalloc(&dc, in.c.size() * sizeof(bf16)));
  CHECK_CUDA(cudaMalloc(&y, in.targets.size() * sizeof(std::int64_t)));
  CHECK_CUDA(cudaMalloc(&loss, sizeof(float)));
  CHECK_CUDA(cudaMemcpy(e, in.e.data(), in.e.size() * sizeof(bf16), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(c, in.c.data(), in.c.size() * sizeof(bf16), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(y, in.targets.data(), in.targets.size() * sizeof(std::int64_t), cudaMemcpyHostToDevice));

  cce::problem<bf16> p;
  p.n = N;
  p.d = D;
  p.v = V;
  p.e = e;
  p.c = c;
  p.targets = y;
  const cce::linear_cross_entropy<bf16> op{cce::options{}};
  cce::device_info dev;
  check(cce::current_device(dev), "device");
  const std::size_t saved_bytes = op.saved_bytes(p), work_bytes = op.workspace_bytes(p, dev, kBudget);
  void *saved, *work;
  CHECK_CUDA(cudaMalloc(&saved, saved_bytes));
  CHECK_CUDA(cudaMalloc(&work, work_bytes));

  cce::forward_outputs out;
  out.loss = loss;
  cce::gradients<bf16> grads;
  grads.de = de;
  grads.dc = dc;
  cudaEvent_t t0, t1, t2;
  CHECK_CUDA(cudaEventCreate(&t0));
  CHECK_CUDA(cudaEventCreate(&t1));
  CHECK_CUDA(cudaEventCreate(&t2));
  for (int warm = 0; warm < 2; ++warm) {  // the first round loads the kernels
    CHECK_CUDA(cudaEventRecord(t0));
    check(op.forward(p, out, saved, saved_bytes, work, work_bytes), "forward");
    CHECK_CUDA(cudaEventRecord(t1));
    check(op.backward(p, {}, grads, saved, saved_bytes, work, work_bytes), "backward");
    CHECK_CUDA(cudaEventRecord(t2));
    CHECK_CUDA(cudaEventSynchronize(t2));
  }
  float fwd_ms = 0.f, bwd_ms = 0.f, host_loss = 0.f;
  CHECK_CUDA(cudaEventElapsedTime(&fwd_ms, t0, t1));
  CHECK_CUDA(cudaEventElapsedTime(&bwd_ms, t1, t2));
  CHECK_CUDA(cudaMemcpy(&host_loss, loss, sizeof(float), cudaMemcpyDeviceToHost));

  const double logits_mb = double(N) * double(V) * 4.0 / 1e6;  // fp32 logits of the materialised approach
  std::printf("device: sm_%d, %d SMs\n", dev.arch, dev.sm_count);
  std::printf("loss %.6f   forward %.3f ms   backward %.3f ms\n", host_loss, fwd_ms, bwd_ms);
  std::printf("extra memory: %.2f MB (saved %.3f MB + workspace %.2f MB) vs %.1f MB of fp32 logits\n",
              double(saved_bytes + work_bytes) / 1e6, double(saved_bytes) / 1e6, double(work_bytes) / 1e6, logits_mb);
  for (void* ptr : {static_cast<void*>(e), static_cast<void*>(c), static_cast<void*>(de), static_cast<void*>(dc),
                    static_cast<void*>(y), static_cast<void*>(loss), saved, work}) {
    CHECK_CUDA(cudaFree(ptr));
  }
  return 0;
}

int run_on_cpu(const inputs& in) {
  cce::problem<bf16> p;
  p.n = N;
  p.d = D;
  p.v = V;
  p.e = in.e.data();
  p.c = in.c.data();
  p.targets = in.targets.data();
  const cce::host::tiled_executor<bf16> ex(cce::options{}, 64, 128);
  const std::size_t saved_bytes = ex.saved_bytes(p), work_bytes = ex.workspace_bytes(p, kBudget);
  std::vector<std::max_align_t> saved(saved_bytes / sizeof(std::max_align_t) + 64),
      work(work_bytes / sizeof(std::max_align_t) + 64);
  auto aligned = [](std::vector<std::max_align_t>& v) {
    const auto a = reinterpret_cast<std::uintptr_t>(v.data());
    return reinterpret_cast<void*>((a + 255) / 256 * 256);
  };
  float loss = 0.f;
  cce::forward_outputs out;
  out.loss = &loss;
  std::vector<bf16> de(in.e.size()), dc(in.c.size());
  cce::gradients<bf16> grads;
  grads.de = de.data();
  grads.dc = dc.data();
  const auto t0 = std::chrono::steady_clock::now();
  check(ex.forward(p, out, aligned(saved), saved_bytes, aligned(work), work_bytes), "forward");
  const auto t1 = std::chrono::steady_clock::now();
  check(ex.backward(p, {}, grads, aligned(saved), saved_bytes, aligned(work), work_bytes), "backward");
  const auto t2 = std::chrono::steady_clock::now();
  const double logits_mb = double(N) * double(V) * 4.0 / 1e6;
  std::printf("no GPU: the CPU tiled executor ran the blockwise algorithm\n");
  std::printf("loss %.6f   forward %.0f ms   backward %.0f ms (CPU)\n", loss,
              std::chrono::duration<double, std::milli>(t1 - t0).count(),
              std::chrono::duration<double, std::milli>(t2 - t1).count());
  std::printf("extra memory: %.2f MB (saved + workspace) vs %.1f MB of fp32 logits\n",
              double(saved_bytes + work_bytes) / 1e6, logits_mb);
  return 0;
}

}  // namespace

int main() {
  const inputs in = make_inputs();
  std::printf("cce example: N=%lld tokens, D=%lld, V=%lld, bf16\n", (long long)N, (long long)D, (long long)V);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) return run_on_gpu(in);
  cudaGetLastError();
  return run_on_cpu(in);
}
