// 02_find_package: the smallest program that computes a loss with cce on the GPU.
//
// A zero classifier (as an untied head often starts) makes every class equally likely, so the loss must be log V
// whatever the embeddings are: the program checks that. Without a GPU it says so and exits 0.
//
//   cmake -S examples/02_find_package -B build-02 -DCMAKE_PREFIX_PATH=<cce install prefix>
//   cmake --build build-02 && ./build-02/02_find_package
#include <cmath>
#include <cstdio>
#include <vector>

#include <cce/cce.cuh>

int main() {
  using bf16 = __nv_bfloat16;
  constexpr int n = 256, d = 128, v = 4096;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("02_find_package: no GPU visible, nothing to compute\n");
    return 0;
  }
  std::vector<bf16> e(n * d);
  std::vector<std::int64_t> y(n);
  for (int i = 0; i < n * d; ++i) e[i] = __float2bfloat16(std::sin(0.1f * float(i)));
  for (int i = 0; i < n; ++i) y[i] = (i * 7919) % v;

  bf16 *de, *dc;
  std::int64_t* dy;
  float* loss;
  void *saved, *work;
  cudaMalloc(&de, e.size() * sizeof(bf16));
  cudaMalloc(&dc, std::size_t(v) * d * sizeof(bf16));
  cudaMalloc(&dy, y.size() * sizeof(std::int64_t));
  cudaMalloc(&loss, sizeof(float));
  cudaMemcpy(de, e.data(), e.size() * sizeof(bf16), cudaMemcpyHostToDevice);
  cudaMemset(dc, 0, std::size_t(v) * d * sizeof(bf16));
  cudaMemcpy(dy, y.data(), y.size() * sizeof(std::int64_t), cudaMemcpyHostToDevice);

  cce::problem<bf16> p;
  p.n = n, p.d = d, p.v = v, p.e = de, p.c = dc, p.targets = dy;
  const cce::linear_cross_entropy<bf16> op;
  cce::device_info dev;
  if (cce::current_device(dev) != cce::status::success) return 1;
  const std::size_t saved_bytes = op.saved_bytes(p), work_bytes = op.workspace_bytes(p, dev);
  cudaMalloc(&saved, saved_bytes);
  cudaMalloc(&work, work_bytes);
  cce::forward_outputs out;
  out.loss = loss;
  const cce::status s = op.forward(p, out, saved, saved_bytes, work, work_bytes);
  float host_loss = 0.f;
  const cudaError_t err = cudaMemcpy(&host_loss, loss, sizeof(float), cudaMemcpyDeviceToHost);
  if (s != cce::status::success || err != cudaSuccess) {
    std::printf("02_find_package: %s / %s\n", cce::to_string(s), cudaGetErrorString(err));
    return 1;
  }
  const bool ok = std::abs(host_loss - std::log(float(v))) <= 1e-5f * std::log(float(v));
  std::printf("02_find_package: loss %.6f, log V = %.6f: %s\n", host_loss, std::log(float(v)), ok ? "ok" : "WRONG");
  for (void* q : {static_cast<void*>(de), static_cast<void*>(dc), static_cast<void*>(dy), static_cast<void*>(loss),
                  saved, work}) {
    cudaFree(q);
  }
  return ok ? 0 : 1;
}
