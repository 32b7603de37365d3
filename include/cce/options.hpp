// What to compute: plain host types, no CUDA needed. The math each option enters is in docs/api.md.
#pragma once

#include <cstdint>

namespace cce {

enum class reduction : int { none, sum, mean };

// Gradient filter: skip (row block x vocab tile) pairs whose softmax mass is negligible.
enum class filter_mode : int {
  none,       // every tile contributes (exact)
  automatic,  // eps = machine epsilon of the input type / 32
  threshold,  // eps = options::filter_eps
};

enum class accumulation : int {
  fp32,   // plain fp32 sums
  kahan,  // compensated fp32 sums where values are added across tiles
};

// Backward operating points of docs/api.md, chosen by the workspace budget unless pinned.
enum class backward_mode : int { automatic, minimal, chunked, loss_and_grad };

enum class target_type : int { int32, int64 };

struct options {
  std::int64_t ignore_index = -100;
  cce::reduction reduction = reduction::mean;
  float softcap = 0.f;          // k in k*tanh(x/k); 0 disables
  float temperature = 1.f;      // logits are divided by it, > 0
  float label_smoothing = 0.f;  // epsilon in [0, 1], as torch's F.cross_entropy
  float z_loss = 0.f;           // lambda of lambda * lse^2, >= 0
  filter_mode filter = filter_mode::automatic;
  float filter_eps = 0.f;       // used with filter_mode::threshold
  // The gradients the filter applies to (apple's filter_e_grad, filter_c_grad). With only one of them, the backward
  // computes every tile's dZ and only that gradient's product skips the negligible ones; dBias and the low-rank
  // factors' gradients then take every tile, and vocab_sort has no effect. With neither, the filter is off.
  bool filter_de = true;
  bool filter_dc = true;
  // With the filter on, rows whose every probability is at most (1 + tolerance) / V take 1/V as a baseline and the
  // filter skips their deviations from it (docs/api.md; with a softcap the test is stricter, filter/predicates.hpp).
  // 0: tolerance = eps / 2, which keeps the filter's bound;
  // larger values (1/16) also cover softmaxes that are only nearly flat, with an error the bound does not cover.
  float uniform_tolerance = 0.f;
  accumulation accum = accumulation::fp32;
  bool deterministic = false;   // bitwise repeatable: no floating-point atomics, fixed reduction order
  bool accumulate = false;      // gradients are added to the caller's buffers instead of overwriting them
  bool allow_tf32 = false;      // fp32 inputs may use TF32 tensor cores
  std::int64_t shift = 0;       // row (b, t) pairs with target (b, t + shift); needs problem::seq_len
  cce::backward_mode backward_mode = backward_mode::automatic;
  bool hopper_kernels = true;   // sm_90a kernels where compiled in and applicable; false pins the portable path
  bool vocab_sort = false;      // backward walks the classes by decreasing average logit, so the filter skips more

  // `exact` mode: no filter, fixed reduction order, bitwise repeatable.
  static constexpr options exact() noexcept {
    options o{};
    o.filter = filter_mode::none;
    o.deterministic = true;
    return o;
  }
};

}  // namespace cce
