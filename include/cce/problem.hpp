// The data of one call: inputs (problem), forward outputs and gradient outputs. Pointers are device pointers for
// the GPU path and host pointers for cce::host. Row-major matrices with explicit leading dimensions.
#pragma once

#include <cstdint>

#include <cce/options.hpp>
#include <cce/vocab_shard.hpp>

namespace cce {

// Optional low-rank head: the effective classifier is C + scale * B * A, never formed.
template <class T>
struct lora_head {
  const T* a = nullptr;  // r x D, leading dimension lda >= D
  const T* b = nullptr;  // V x r, leading dimension ldb >= r
  std::int64_t rank = 0;
  std::int64_t lda = 0;  // 0 means D
  std::int64_t ldb = 0;  // 0 means rank
  float scale = 1.f;
};

template <class T>
struct problem {
  std::int64_t n = 0;  // rows (tokens)
  std::int64_t d = 0;  // hidden size
  std::int64_t v = 0;  // classes (of this vocabulary shard when `shard` is set)
  const T* e = nullptr;  // N x D embeddings
  std::int64_t lde = 0;  // 0 means D
  const T* c = nullptr;  // V x D classifier
  std::int64_t ldc = 0;  // 0 means D
  const void* targets = nullptr;  // N class indices
  target_type targets_type = target_type::int64;
  const T* bias = nullptr;              // optional, V
  const float* class_weights = nullptr; // optional, V; with a shard, all global_v weights (every rank needs w_y)
  lora_head<T> lora{};                  // optional, rank 0 disables
  std::int64_t seq_len = 0;             // sequence length when options::shift > 0; must divide N
  // Vocabulary parallelism: c, bias and lora.b hold this shard's V classes; targets are global class ids.
  vocab_shard shard{};

  constexpr std::int64_t e_stride() const noexcept { return lde ? lde : d; }
  constexpr std::int64_t c_stride() const noexcept { return ldc ? ldc : d; }
  constexpr std::int64_t a_stride() const noexcept { return lora.lda ? lora.lda : d; }
  constexpr std::int64_t b_stride() const noexcept { return lora.ldb ? lora.ldb : lora.rank; }
  constexpr bool has_lora() const noexcept { return lora.rank > 0; }
  // Classes of the whole vocabulary: what targets index and what label smoothing averages over.
  constexpr std::int64_t total_classes() const noexcept { return shard.global_v ? shard.global_v : v; }
};

// Forward outputs. Only `loss` is required (it may be null only where it would hold no value: reduction none
// with N = 0); per-row outputs are written for every row (0 for ignored rows, except lse, which is defined for
// every row).
struct forward_outputs {
  float* loss = nullptr;            // 1 value (mean, sum) or N values (none)
  float* lse = nullptr;             // N
  float* entropy = nullptr;         // N: lse - sum_v p_v z_v
  float* target_logprob = nullptr;  // N: z_y - lse
  std::uint8_t* correct = nullptr;  // N: 1 when argmax_v z_v == y
  int* error = nullptr;             // device error word: set to a cce::status when a target is invalid
};

// Gradient outputs, each optional (a frozen head asks for no dC). G is the input type T or float.
template <class G>
struct gradients {
  G* de = nullptr;     // N x D, leading dimension ld_de (0 means D)
  G* dc = nullptr;     // V x D, leading dimension ld_dc (0 means D)
  G* dbias = nullptr;  // V
  G* da = nullptr;     // r x D
  G* db = nullptr;     // V x r
  std::int64_t ld_de = 0;
  std::int64_t ld_dc = 0;
  // Optional, 2 counters (device memory for the GPU): vocabulary tiles (row tile x vocab tile pairs) the backward
  // computed and skipped by the gradient filter; overwritten by each backward.
  std::int64_t* filter_tiles = nullptr;
};

// Upstream gradient of the loss: a device scalar for mean and sum, N values for none; null means 1.
struct loss_gradient {
  const float* grad = nullptr;
};

}  // namespace cce
