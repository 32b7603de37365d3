// 04_lora_head: fine-tuning a frozen LM head with a low-rank (LoRA) update, with cce computing the loss, dA and dB.
//
// The effective classifier is C + s·B·A (C: V x D, frozen; A: r x D; B: V x r; s = alpha / r). cce never forms it:
// `problem::lora` makes the head [C | B] over the columns [E | s·E·Aᵀ], and the backward returns
//
//   dA = s·(draw·B)ᵀ·E      dB = s·drawᵀ·(E·Aᵀ)      (draw: the gradient of the loss at the raw logits)
//
// and nothing else: E and C are frozen, so no dE or dC is requested.
//
// Data: a frozen "pretrained" head C and a teacher C + s·B*·A* that differs from it by a rank-r update; each
// embedding points towards its target's teacher row, so C alone fits the targets only partly and the low-rank
// update has something to learn. A starts random and B at zero (as LoRA does), so the first step sees C alone.
// After the Adam steps the program checks the loss, dA and dB of the first rows against the float64 reference of
// C + s·B·A (cce::host::reference_forward / reference_backward) with the library's tolerances (docs/testing.md)
// and exits with 1 on a mismatch.
//
// Usage:  04_lora_head [steps = 30]
//
// With a GPU: N = 4,096 tokens, D = 512, V = 32,000, r = 16, bf16. Without one the same program runs at N = 256,
// D = 64, V = 2,000, r = 4 on the CPU (cce's tiled executor, the same blockwise algorithm).
//
//   cmake -B build -G Ninja && cmake --build build --target 04_lora_head && ./build/examples/04_lora_head/04_lora_head
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include <cce/host/reference.hpp>

#include "example.cuh"

namespace {

using bf16 = __nv_bfloat16;
using example::buffer;
using example::check;

struct sizes {
  std::int64_t n, d, v, rank;
};
constexpr sizes kGpuSizes{4096, 512, 32000, 16}, kCpuSizes{256, 64, 2000, 4};
constexpr std::int64_t kCheckRows = 32;  // the float64 reference materialises every logit: a few rows suffice
constexpr float kScale = 2.f;            // s = alpha / r
constexpr float kLearningRate = 1e-2f;

// Tolerances of docs/testing.md against float64 from the same rounded inputs: loss relative error 1e-5 (fp32
// accumulation); each gradient's relative L2 error 2·u(T) with the gradient filter on, u(bf16) = 2⁻⁸.
constexpr double kLossTolerance = 1e-5, kGradTolerance = 2.0 / 256;

std::vector<float> normal(std::size_t count, float stddev, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.f, stddev);
  std::vector<float> x(count);
  for (float& t : x) t = dist(rng);
  return x;
}

std::vector<bf16> to_bf16(const std::vector<float>& x) {
  std::vector<bf16> y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = __float2bfloat16(x[i]);
  return y;
}

struct inputs {
  std::vector<bf16> e, c;             // N x D, V x D
  std::vector<std::int64_t> targets;  // N
  std::vector<float> a;               // r x D: LoRA's random start
};

inputs make_inputs(const sizes& s) {
  std::mt19937 rng(4);
  const float unit = 1.f / std::sqrt(float(s.d));  // rows of about unit norm
  const std::vector<float> c = normal(std::size_t(s.v * s.d), unit, rng);
  const std::vector<float> a_teacher = normal(std::size_t(s.rank * s.d), unit, rng);
  const std::vector<float> b_teacher =
      normal(std::size_t(s.v * s.rank), 1.f / (kScale * std::sqrt(float(s.rank))), rng);
  inputs in;
  in.c = to_bf16(c);
  in.a = normal(std::size_t(s.rank * s.d), unit, rng);
  std::normal_distribution<float> noise(0.f, 1.f);
  std::vector<float> e(std::size_t(s.n * s.d));
  for (std::int64_t i = 0; i < s.n; ++i) {
    const std::int64_t y = std::int64_t(rng() % std::uint32_t(s.v));
    in.targets.push_back(y);
    for (std::int64_t k = 0; k < s.d; ++k) {
      float delta = 0.f;  // the teacher's row y: c_y + s·B*_y·A*
      for (std::int64_t r = 0; r < s.rank; ++r)
        delta += b_teacher[std::size_t(y * s.rank + r)] * a_teacher[std::size_t(r * s.d + k)];
      e[std::size_t(i * s.d + k)] = noise(rng) + 6.f * (c[std::size_t(y * s.d + k)] + kScale * delta);
    }
  }
  in.e = to_bf16(e);
  return in;
}

// ‖x − ref‖ / ‖ref‖ (absolute when ref is 0).
double relative_l2(const std::vector<float>& x, const std::vector<double>& ref) {
  double diff = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    diff += (double(x[i]) - ref[i]) * (double(x[i]) - ref[i]);
    norm += ref[i] * ref[i];
  }
  return norm > 0.0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

bool report(const char* what, double error, double tolerance) {
  const bool ok = error <= tolerance;  // false for NaN too
  std::printf("  %-5s relative error %.2e  tolerance %.2e  %s\n", what, error, tolerance, ok ? "ok" : "FAILED");
  return ok;
}

// cce on the first kCheckRows rows of `p` against the float64 reference of the same rounded inputs, read back
// from wherever `p` points.
bool check_against_reference(const example::loss_fn<bf16>& fn, const cce::options& opts, cce::problem<bf16> p,
                             const buffer<bf16>& e, const buffer<bf16>& c, const buffer<std::int64_t>& targets,
                             const buffer<bf16>& a, const buffer<bf16>& b) {
  const bool gpu = fn.gpu();
  p.n = std::min(p.n, kCheckRows);
  const std::size_t saved_bytes = fn.saved_bytes(p), work_bytes = fn.workspace_bytes(p);
  buffer<unsigned char> saved(gpu, saved_bytes), work(gpu, work_bytes);
  buffer<float> loss(gpu, 1), da(gpu, a.size()), db(gpu, b.size());
  cce::forward_outputs out;
  out.loss = loss.get();
  cce::gradients<float> grads;
  grads.da = da.get();
  grads.db = db.get();
  check(fn.forward(p, out, saved.get(), saved_bytes, work.get(), work_bytes), "cce forward");
  check(fn.backward(p, grads, saved.get(), saved_bytes, work.get(), work_bytes), "cce backward");

  // The reference reads host copies of exactly what cce read.
  const std::vector<bf16> he = e.download(), hc = c.download(), ha = a.download(), hb = b.download();
  const std::vector<std::int64_t> hy = targets.download();
  cce::problem<bf16> hp = p;
  hp.e = he.data();
  hp.c = hc.data();
  hp.targets = hy.data();
  hp.lora.a = ha.data();
  hp.lora.b = hb.data();
  const double ref_loss = cce::host::reference_forward(hp, opts).loss_scalar;
  const cce::host::reference_gradients ref = cce::host::reference_backward(hp, opts, {1.0});
  const float cce_loss = loss.download()[0];

  std::printf("check on the first %lld rows against the float64 reference of C + s*B*A: loss %.6f (reference %.6f)\n",
              (long long)p.n, cce_loss, ref_loss);
  bool ok = report("loss", std::abs(double(cce_loss) - ref_loss) / std::abs(ref_loss), kLossTolerance);
  ok = report("dA", relative_l2(da.download(), ref.da), kGradTolerance) && ok;
  ok = report("dB", relative_l2(db.download(), ref.db), kGradTolerance) && ok;
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t steps = 30;
  if (argc > 2 || (argc == 2 && (steps = std::atoll(argv[1])) <= 0)) {
    std::fprintf(stderr, "usage: %s [steps = 30]\n", argv[0]);
    return 2;
  }
  const bool gpu = example::gpu_available();
  const sizes s = gpu ? kGpuSizes : kCpuSizes;
  std::printf("%s: N=%lld, D=%lld, V=%lld, rank %lld, scale %.1f, bf16\n",
              gpu ? "GPU" : "no GPU visible, CPU (cce's tiled executor)", (long long)s.n, (long long)s.d,
              (long long)s.v, (long long)s.rank, kScale);

  const inputs in = make_inputs(s);
  buffer<bf16> e(gpu, in.e.size()), c(gpu, in.c.size());
  buffer<std::int64_t> targets(gpu, in.targets.size());
  e.upload(in.e);
  c.upload(in.c);
  targets.upload(in.targets);
  // Trainable: fp32 master weights A (random) and B (zero), and the bf16 copies cce reads.
  const auto a_size = std::size_t(s.rank * s.d), b_size = std::size_t(s.v * s.rank);
  buffer<float> a(gpu, a_size), b(gpu, b_size), da(gpu, a_size), db(gpu, b_size), loss(gpu, 1);
  buffer<bf16> a16(gpu, a_size), b16(gpu, b_size);
  a.upload(in.a);
  a16.upload(to_bf16(in.a));
  example::adam a_opt(gpu, a_size, kLearningRate), b_opt(gpu, b_size, kLearningRate);

  const cce::options opts;  // mean over the rows, gradient filter on
  const example::loss_fn<bf16> fn(gpu, opts);
  cce::problem<bf16> p;
  p.n = s.n;
  p.d = s.d;
  p.v = s.v;
  p.e = e.get();
  p.c = c.get();
  p.targets = targets.get();
  p.lora.a = a16.get();
  p.lora.b = b16.get();
  p.lora.rank = s.rank;
  p.lora.scale = kScale;
  const std::size_t saved_bytes = fn.saved_bytes(p), work_bytes = fn.workspace_bytes(p);
  buffer<unsigned char> saved(gpu, saved_bytes), work(gpu, work_bytes);
  cce::forward_outputs out;
  out.loss = loss.get();
  cce::gradients<float> grads;  // only the adapter's gradients, in fp32 for the fp32 master weights
  grads.da = da.get();
  grads.db = db.get();
  std::printf("trainable %lld of %lld head parameters; cce saved %.1f KiB, workspace %.1f MiB\n",
              (long long)(a_size + b_size), (long long)(s.v * s.d + a_size + b_size), double(saved_bytes) / 1024,
              double(work_bytes) / (1 << 20));

  float first = 0.f, last = 0.f;
  for (std::int64_t step = 1; step <= steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    check(fn.forward(p, out, saved.get(), saved_bytes, work.get(), work_bytes), "cce forward");
    check(fn.backward(p, grads, saved.get(), saved_bytes, work.get(), work_bytes), "cce backward");
    a_opt.step(a.get(), da.get(), a16.get(), false);  // cce overwrites dA and dB on every call
    b_opt.step(b.get(), db.get(), b16.get(), false);
    last = loss.download()[0];
    if (step == 1) first = last;
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::printf("step %3lld  loss %.5f  %.2f ms\n", (long long)step, last, ms);
  }
  std::printf("loss with the frozen head alone %.5f, after %lld steps %.5f\n", first, (long long)steps, last);
  if (steps > 1 && !(last < first)) {
    std::printf("the low-rank update did not lower the loss\n");
    return 1;
  }
  return check_against_reference(fn, opts, p, e, c, targets, a16, b16) ? 0 : 1;
}
