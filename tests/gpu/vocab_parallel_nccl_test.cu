// Vocabulary parallelism over NCCL: one thread per visible GPU, each holding a contiguous shard of the classifier,
// runs cce::nccl::vocab_parallel (all-gather of the statistics, all-reduce of dE) at the llama3 and gemma2 shapes.
// The loss, dE and every rank's slice of dC are checked against one GPU running the whole vocabulary, and the time
// per rank is printed. Exits with 77 (skipped) with fewer than two GPUs.
//
//   vocab_parallel_nccl_test [tokens]      (default 4096)
#include <cuda_runtime.h>
#include <nccl.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include <cce/cce.cuh>
#include <cce/nccl/vocab_parallel.cuh>

namespace {

using namespace cce;
using bf16 = __nv_bfloat16;

constexpr int kSkip = 77;

#define CHECK_CUDA(x)                                                                             \
  do {                                                                                            \
    if (cudaError_t e_ = (x); e_ != cudaSuccess) {                                                \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));           \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)
#define CHECK_CCE(x)                                                                              \
  do {                                                                                            \
    if (cce::status s_ = (x); s_ != cce::status::success) {                                       \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cce::to_string(s_));                \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

struct shape {
  const char* name;
  std::int64_t d, v;
  float softcap;
};

// A reproducible value per global element index, so that a shard fills exactly its slice of the whole matrix.
__device__ float hashed_normalish(std::uint64_t i, std::uint64_t seed) {
  std::uint64_t x = (i + 1) * 0x9e3779b97f4a7c15ull ^ seed;
  x ^= x >> 31;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 29;
  // Sum of four uniforms in [-0.5, 0.5): mean 0, variance 1/3.
  float s = 0.f;
  for (int k = 0; k < 4; ++k) s += float((x >> (16 * k)) & 0xffff) / 65536.f - 0.5f;
  return s * 1.7320508f;
}

__global__ void fill_kernel(bf16* out, std::int64_t count, std::int64_t first, float scale, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < count;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    out[i] = __float2bfloat16(scale * hashed_normalish(std::uint64_t(first + i), seed));
  }
}

void fill(bf16* out, std::int64_t count, std::int64_t first, float scale, std::uint64_t seed) {
  fill_kernel<<<1024, 256>>>(out, count, first, scale, seed);
  CHECK_CUDA(cudaGetLastError());
}

template <class U>
U* device_alloc(std::size_t count) {
  U* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, std::max<std::size_t>(count, 1) * sizeof(U)));
  return p;
}

template <class U>
std::vector<U> download(const U* p, std::size_t count) {
  std::vector<U> h(count);
  CHECK_CUDA(cudaMemcpy(h.data(), p, count * sizeof(U), cudaMemcpyDeviceToHost));
  return h;
}

struct results {
  float loss = 0.f;
  std::vector<float> de;  // N x D
  std::vector<float> dc;  // the rank's (or the whole) classes x D
  double ms = 0.0;        // forward + backward, per iteration
};

constexpr int kIterations = 5;

// Inputs of a shape, as one device sees them: E (all rows), C rows [v0, v0 + v), targets.
struct inputs {
  bf16 *e = nullptr, *c = nullptr;
  std::int64_t* targets = nullptr;
  problem<bf16> p;
  inputs(const shape& s, std::int64_t n, std::int64_t v0, std::int64_t v, const std::vector<std::int64_t>& y) {
    e = device_alloc<bf16>(std::size_t(n * s.d));
    c = device_alloc<bf16>(std::size_t(v * s.d));
    targets = device_alloc<std::int64_t>(std::size_t(n));
    fill(e, n * s.d, 0, 1.f, 1);
    fill(c, v * s.d, v0 * s.d, 2.f / std::sqrt(float(s.d)), 2);
    CHECK_CUDA(cudaMemcpy(targets, y.data(), y.size() * sizeof(std::int64_t), cudaMemcpyHostToDevice));
    p.n = n;
    p.d = s.d;
    p.v = v;
    p.e = e;
    p.c = c;
    p.targets = targets;
  }
  ~inputs() {
    cudaFree(e);
    cudaFree(c);
    cudaFree(targets);
  }
};

options shape_options(const shape& s) {
  options o;
  o.softcap = s.softcap;
  return o;
}

template <class Step>
double time_ms(Step step) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  step();  // warm-up
  CHECK_CUDA(cudaEventRecord(start));
  for (int i = 0; i < kIterations; ++i) step();
  CHECK_CUDA(cudaEventRecord(stop));
  CHECK_CUDA(cudaEventSynchronize(stop));
  float ms = 0.f;
  CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms / kIterations;
}

// The whole vocabulary on device 0.
results run_single(const shape& s, std::int64_t n, const std::vector<std::int64_t>& y) {
  CHECK_CUDA(cudaSetDevice(0));
  inputs in(s, n, 0, s.v, y);
  const linear_cross_entropy<bf16> op{shape_options(s)};
  device_info dev;
  CHECK_CCE(current_device(dev));
  const std::size_t sb = op.saved_bytes(in.p), wb = op.workspace_bytes(in.p, dev);
  auto* saved = device_alloc<unsigned char>(sb);
  auto* ws = device_alloc<unsigned char>(wb);
  auto* loss = device_alloc<float>(1);
  auto* de = device_alloc<float>(std::size_t(n * s.d));
  auto* dc = device_alloc<float>(std::size_t(s.v * s.d));
  forward_outputs out;
  out.loss = loss;
  gradients<float> g;
  g.de = de;
  g.dc = dc;
  results r;
  r.ms = time_ms([&] {
    CHECK_CCE(op.forward(in.p, out, saved, sb, ws, wb));
    CHECK_CCE(op.backward(in.p, {}, g, saved, sb, ws, wb));
  });
  r.loss = download(loss, 1)[0];
  r.de = download(de, std::size_t(n * s.d));
  r.dc = download(dc, std::size_t(s.v * s.d));
  for (void* p : {static_cast<void*>(saved), static_cast<void*>(ws), static_cast<void*>(loss),
                  static_cast<void*>(de), static_cast<void*>(dc)}) {
    cudaFree(p);
  }
  return r;
}

// One rank: its shard, the NCCL forward (all-gather) and backward (all-reduce of dE).
void run_rank(const shape& s, std::int64_t n, const std::vector<std::int64_t>& y,
              const std::vector<std::int64_t>& offsets, ncclComm_t comm, int rank, results& r) {
  CHECK_CUDA(cudaSetDevice(rank));
  const std::int64_t v0 = offsets[std::size_t(rank)];
  const std::int64_t v = (std::size_t(rank) + 1 < offsets.size() ? offsets[std::size_t(rank) + 1] : s.v) - v0;
  inputs in(s, n, v0, v, y);
  in.p.shard = {v0, s.v};
  const nccl::vocab_parallel<bf16> vp{shape_options(s), comm, offsets};
  device_info dev;
  CHECK_CCE(current_device(dev));
  const std::size_t sb = vp.op().saved_bytes(in.p), wb = vp.op().workspace_bytes(in.p, dev);
  const std::size_t gb = vp.gathered_bytes(in.p);
  auto* saved = device_alloc<unsigned char>(sb);
  auto* ws = device_alloc<unsigned char>(wb);
  auto* gathered = device_alloc<unsigned char>(gb);
  auto* loss = device_alloc<float>(1);
  auto* de = device_alloc<float>(std::size_t(n * s.d));
  auto* dc = device_alloc<float>(std::size_t(v * s.d));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  forward_outputs out;
  out.loss = loss;
  gradients<float> g;
  g.de = de;
  g.dc = dc;
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  auto step = [&] {
    CHECK_CCE(vp.forward(in.p, out, gathered, gb, saved, sb, ws, wb, stream));
    CHECK_CCE(vp.backward(in.p, {}, g, nccl::reduce::partial_gradients, saved, sb, ws, wb, stream));
  };
  step();  // warm-up
  CHECK_CUDA(cudaEventRecord(start, stream));
  for (int i = 0; i < kIterations; ++i) step();
  CHECK_CUDA(cudaEventRecord(stop, stream));
  CHECK_CUDA(cudaEventSynchronize(stop));
  float ms = 0.f;
  CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
  r.ms = ms / kIterations;
  r.loss = download(loss, 1)[0];
  r.de = download(de, std::size_t(n * s.d));
  r.dc = download(dc, std::size_t(v * s.d));
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
  for (void* p : {static_cast<void*>(saved), static_cast<void*>(ws), static_cast<void*>(gathered),
                  static_cast<void*>(loss), static_cast<void*>(de), static_cast<void*>(dc)}) {
    cudaFree(p);
  }
}

// ||a - b|| / ||b|| over the pairs accumulated so far.
struct relative_error {
  double num = 0.0, den = 0.0;
  void add(const float* a, const float* b, std::size_t count) {
    for (std::size_t i = 0; i < count; ++i) {
      num += double(a[i] - b[i]) * double(a[i] - b[i]);
      den += double(b[i]) * double(b[i]);
    }
  }
  double value() const { return std::sqrt(num / den); }
};

}  // namespace

int main(int argc, char** argv) {
  int gpus = 0;
  if (cudaGetDeviceCount(&gpus) != cudaSuccess || gpus < 2) {
    std::printf("fewer than two GPUs visible (%d): skipped\n", gpus);
    return kSkip;
  }
  const std::int64_t n = argc > 1 ? std::atoll(argv[1]) : 4096;
  const shape shapes[] = {{"llama3", 4096, 128256, 0.f}, {"gemma2", 2304, 256000, 30.f}};
  // Gradient tolerance of the default (filtered) mode for bf16 inputs: 2 u(bf16).
  const double grad_tol = 2.0 / 256, loss_tol = 1e-5;
  bool ok = true;
  for (const shape& s : shapes) {
    std::vector<std::int64_t> y(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) y[std::size_t(i)] = (i * 7919 + 13) % s.v;  // targets in every shard
    // Uneven shards: rank r holds a share proportional to r + 2.
    std::vector<std::int64_t> offsets;
    std::int64_t weight_total = 0, acc = 0;
    for (int r = 0; r < gpus; ++r) weight_total += r + 2;
    for (int r = 0; r < gpus; ++r) {
      offsets.push_back(s.v * acc / weight_total);
      acc += r + 2;
    }
    const results single = run_single(s, n, y);

    std::vector<ncclComm_t> comms(static_cast<std::size_t>(gpus));
    if (ncclCommInitAll(comms.data(), gpus, nullptr) != ncclSuccess) {
      std::fprintf(stderr, "ncclCommInitAll failed\n");
      return 1;
    }
    std::vector<results> ranks(static_cast<std::size_t>(gpus));
    std::vector<std::thread> threads;
    for (int r = 0; r < gpus; ++r) {
      threads.emplace_back(run_rank, std::cref(s), n, std::cref(y), std::cref(offsets), comms[std::size_t(r)], r,
                           std::ref(ranks[std::size_t(r)]));
    }
    for (auto& t : threads) t.join();
    for (ncclComm_t c : comms) ncclCommDestroy(c);

    std::printf("%s: N=%lld D=%lld V=%lld, %d ranks; one GPU: %.3f ms per forward+backward\n", s.name,
                (long long)n, (long long)s.d, (long long)s.v, gpus, single.ms);
    relative_error dc_err;
    for (int r = 0; r < gpus; ++r) {
      const results& rr = ranks[std::size_t(r)];
      const double loss_err = std::abs(double(rr.loss) - single.loss) / std::abs(double(single.loss));
      relative_error de_err;
      de_err.add(rr.de.data(), single.de.data(), rr.de.size());
      dc_err.add(rr.dc.data(), single.dc.data() + offsets[std::size_t(r)] * s.d, rr.dc.size());
      const bool rank_ok = loss_err <= loss_tol && de_err.value() <= grad_tol;
      ok &= rank_ok;
      std::printf("  rank %d: classes [%lld, %lld) %.3f ms per forward+backward, loss %.6f (rel. err %.2e), "
                  "dE rel. L2 err %.2e %s\n",
                  r, (long long)offsets[std::size_t(r)],
                  (long long)(std::size_t(r) + 1 < offsets.size() ? offsets[std::size_t(r) + 1] : s.v), rr.ms,
                  rr.loss, loss_err, de_err.value(), rank_ok ? "ok" : "FAILED");
    }
    ok &= dc_err.value() <= grad_tol;
    std::printf("  dC (all slices) rel. L2 err %.2e %s\n", dc_err.value(), dc_err.value() <= grad_tol ? "ok" : "FAILED");
  }
  std::printf(ok ? "PASSED\n" : "FAILED\n");
  return ok ? 0 : 1;
}
