// The PyTorch operators cce::forward, cce::backward and cce::loss_and_grad over one cce executor: the CUDA functor
// (ops_cuda.cu) or the CPU tiled executor (ops.cpp). Tensors are checked and turned into a cce::problem here;
// every buffer the library needs (saved state, workspace, outputs, gradients) is a tensor on the inputs' device,
// so CUDA memory comes from the caching allocator.
//
// Options travel as two lists whose positions are fixed below (cce_torch/_ops.py builds them).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <cce/options.hpp>
#include <cce/problem.hpp>
#include <cce/status.hpp>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace cce_torch {

// Positions in the integer option list.
namespace iopt {
enum : int {
  ignore_index, reduction, shift, seq_len, filter, kahan, deterministic, mode, budget, filter_de, filter_dc, count
};
}
// Positions in the float option list.
namespace fopt {
enum : int { softcap, temperature, label_smoothing, z_loss, filter_eps, uniform_tolerance, lora_scale, count };
}
// Bits of the forward's `outputs` argument: which per-row outputs to write.
enum output_bit : std::int64_t { want_lse = 1, want_entropy = 2, want_logprob = 4, want_correct = 8 };
// Positions in the backward's `needs` list.
enum grad_slot : int { grad_e, grad_c, grad_bias, grad_a, grad_b, grad_count };

// A library status as a Python exception: argument errors are ValueError, the rest RuntimeError.
inline void check(cce::status s, const char* call) {
  if (s == cce::status::success) return;
  const bool argument = s == cce::status::invalid_size || s == cce::status::invalid_stride ||
                        s == cce::status::misaligned_pointer || s == cce::status::invalid_option ||
                        s == cce::status::unsupported_dtype || s == cce::status::null_pointer;
  if (argument) TORCH_CHECK_VALUE(false, "cce ", call, ": ", cce::to_string(s));
  TORCH_CHECK(false, "cce ", call, ": ", cce::to_string(s));
}

inline cce::options make_options(at::IntArrayRef io, at::ArrayRef<double> fo) {
  TORCH_CHECK(io.size() == iopt::count && fo.size() == fopt::count, "cce: option lists of the wrong length");
  cce::options o;
  o.ignore_index = io[iopt::ignore_index];
  o.reduction = static_cast<cce::reduction>(io[iopt::reduction]);
  o.shift = io[iopt::shift];
  o.filter = static_cast<cce::filter_mode>(io[iopt::filter]);
  o.filter_de = io[iopt::filter_de] != 0;
  o.filter_dc = io[iopt::filter_dc] != 0;
  o.accum = io[iopt::kahan] ? cce::accumulation::kahan : cce::accumulation::fp32;
  o.deterministic = io[iopt::deterministic] != 0;
  o.backward_mode = static_cast<cce::backward_mode>(io[iopt::mode]);
  o.softcap = static_cast<float>(fo[fopt::softcap]);
  o.temperature = static_cast<float>(fo[fopt::temperature]);
  o.label_smoothing = static_cast<float>(fo[fopt::label_smoothing]);
  o.z_loss = static_cast<float>(fo[fopt::z_loss]);
  o.filter_eps = static_cast<float>(fo[fopt::filter_eps]);
  o.uniform_tolerance = static_cast<float>(fo[fopt::uniform_tolerance]);
  return o;
}

// A matrix the kernels can read in place: unit column stride; its row stride becomes the leading dimension.
inline at::Tensor rows(const at::Tensor& t) {
  return t.stride(-1) == 1 && t.stride(0) >= t.size(1) ? t : t.contiguous();
}

template <class T>
T* ptr(const at::Tensor& t) {
  return t.defined() && t.numel() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

// The inputs of one call, kept alive for the problem that points into them.
template <class T>
struct bound_problem {
  at::Tensor e, c, targets, bias, weight, a, b;
  cce::problem<T> p;

  bound_problem(const at::Tensor& e_in, const at::Tensor& c_in, const at::Tensor& targets_in,
                const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& weight_in,
                const std::optional<at::Tensor>& a_in, const std::optional<at::Tensor>& b_in, at::IntArrayRef io,
                at::ArrayRef<double> fo) {
    TORCH_CHECK_VALUE(e_in.dim() == 2 && c_in.dim() == 2 && targets_in.dim() == 1,
                      "cce: e is N x D, c is V x D and targets has N entries");
    TORCH_CHECK_VALUE(e_in.size(1) == c_in.size(1) && targets_in.size(0) == e_in.size(0),
                      "cce: e, c and targets disagree on N or D");
    TORCH_CHECK_VALUE(c_in.scalar_type() == e_in.scalar_type(), "cce: e and c have different dtypes");
    TORCH_CHECK_VALUE(targets_in.scalar_type() == at::kLong || targets_in.scalar_type() == at::kInt,
                      "cce: targets are int64 or int32");
    e = e_in.size(0) ? rows(e_in) : e_in;
    c = rows(c_in);
    targets = targets_in.contiguous();
    p.n = e.size(0);
    p.d = e.size(1);
    p.v = c.size(0);
    p.e = ptr<const T>(e);
    p.lde = e.size(0) ? e.stride(0) : 0;
    p.c = ptr<const T>(c);
    p.ldc = c.stride(0);
    p.targets = targets.numel() ? targets.data_ptr() : nullptr;
    p.targets_type = targets.scalar_type() == at::kInt ? cce::target_type::int32 : cce::target_type::int64;
    if (bias_in) {
      TORCH_CHECK_VALUE(bias_in->dim() == 1 && bias_in->size(0) == p.v && bias_in->scalar_type() == e.scalar_type(),
                        "cce: bias has V entries of the input dtype");
      bias = bias_in->contiguous();
      p.bias = ptr<const T>(bias);
    }
    if (weight_in) {
      TORCH_CHECK_VALUE(weight_in->dim() == 1 && weight_in->size(0) == p.v && weight_in->scalar_type() == at::kFloat,
                        "cce: class weights are V float32 values");
      weight = weight_in->contiguous();
      p.class_weights = ptr<const float>(weight);
    }
    TORCH_CHECK_VALUE(a_in.has_value() == b_in.has_value(), "cce: a low-rank head needs both A and B");
    if (a_in) {
      TORCH_CHECK_VALUE(a_in->dim() == 2 && b_in->dim() == 2 && a_in->size(1) == p.d && b_in->size(0) == p.v &&
                            b_in->size(1) == a_in->size(0),
                        "cce: the low-rank head is A (r x D) and B (V x r)");
      TORCH_CHECK_VALUE(a_in->scalar_type() == e.scalar_type() && b_in->scalar_type() == e.scalar_type(),
                        "cce: A and B have the input dtype");
      a = rows(*a_in);
      b = rows(*b_in);
      p.lora.a = ptr<const T>(a);
      p.lora.b = ptr<const T>(b);
      p.lora.rank = a.size(0);
      p.lora.lda = a.stride(0);
      p.lora.ldb = b.stride(0);
      p.lora.scale = static_cast<float>(fo[fopt::lora_scale]);
    }
    p.seq_len = io[iopt::seq_len];
  }
};

// (loss, lse, entropy, logprob, correct, saved) and (dE, dC, dBias, dA, dB).
using forward_result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using backward_result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// (loss, dE, dC, dBias, dA, dB)
using loss_and_grad_result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline at::Tensor device_bytes(std::int64_t n, const at::Tensor& like) {
  return at::empty({n}, like.options().dtype(at::kByte));
}

// The library asks for 256-byte aligned buffers: what the CUDA caching allocator returns. CPU tensors are aligned
// to 64 bytes only; there the call runs on an aligned copy (`aligned_scratch`), so that the operators' outputs
// stay plain tensors.
inline bool is_aligned(const at::Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 256 == 0; }

inline at::Tensor aligned_scratch(const at::Tensor& t) {
  if (t.numel() == 0 || is_aligned(t)) return t;
  at::Tensor raw = device_bytes(t.numel() + 256, t);
  const auto address = reinterpret_cast<std::uintptr_t>(raw.data_ptr());
  return raw.narrow(0, std::int64_t((256 - address % 256) % 256), t.numel()).copy_(t);
}

// The loss of a call without rows (the library is not called): the sum is 0, the mean 0 / 0 as F.cross_entropy.
inline void loss_without_rows(at::Tensor& loss, const cce::options& o) {
  if (o.reduction != cce::reduction::none) loss.fill_(o.reduction == cce::reduction::sum ? 0. : NAN);
}

// Scratch of `bytes` on the device of `like`, as the library asks for it.
inline at::Tensor workspace_for(std::size_t bytes, const at::Tensor& like) {
  return aligned_scratch(device_bytes(std::int64_t(bytes), like));
}

// Exec provides, for element type T:  saved_bytes(p), workspace_bytes(p, budget), forward(p, out, saved, ws),
// backward(p, grad, gradients, saved, ws) and loss_and_grad(p, out, gradients, saved, ws). The forward asks for
// budget 1, the smallest plan: its buffers and results do not depend on the backward's operating point, so it runs
// with the least scratch. The backward's budget (0: the default of the pinned mode) selects that operating point.
template <class T, class Exec>
forward_result forward_op(const Exec& ex, const bound_problem<T>& bp, const cce::options& o, std::int64_t outputs,
                          std::int64_t saved_bytes) {
  const cce::problem<T>& p = bp.p;
  const at::Tensor& like = bp.c;
  const auto f32 = like.options().dtype(at::kFloat);
  auto per_row = [&](std::int64_t bit, at::ScalarType type) {
    return at::empty({(outputs & bit) ? p.n : 0}, like.options().dtype(type));
  };
  at::Tensor loss = o.reduction == cce::reduction::none ? at::empty({p.n}, f32) : at::empty({}, f32);
  at::Tensor lse = per_row(want_lse, at::kFloat), entropy = per_row(want_entropy, at::kFloat),
             logprob = per_row(want_logprob, at::kFloat), correct = per_row(want_correct, at::kBool);
  const std::size_t need = ex.saved_bytes(p);
  TORCH_CHECK(std::size_t(saved_bytes) >= need, "cce: saved-state size ", saved_bytes, " below the library's ", need,
              " bytes");
  // zeroed: the layout's padding is never written, and outputs should not hold stale bytes
  at::Tensor saved = device_bytes(saved_bytes, like).zero_();
  at::Tensor saved_call = aligned_scratch(saved);
  const std::size_t ws_bytes = ex.workspace_bytes(p, 1);
  at::Tensor ws = workspace_for(ws_bytes, like);
  cce::forward_outputs out;
  out.loss = ptr<float>(loss);
  out.lse = ptr<float>(lse);
  out.entropy = ptr<float>(entropy);
  out.target_logprob = ptr<float>(logprob);
  out.correct = ptr<std::uint8_t>(correct);
  if (p.n == 0 && o.reduction != cce::reduction::none)
    loss_without_rows(loss, o);
  else
    check(ex.forward(p, out, ptr<void>(saved_call), std::size_t(saved_bytes), ptr<void>(ws), ws_bytes), "forward");
  if (!saved_call.is_same(saved)) saved.copy_(saved_call);
  return {loss, lse, entropy, logprob, correct, saved};
}

// The gradient tensors a call writes (empty where not needed, so null in the library's gradients) and the
// library's view of them.
template <class T>
struct gradient_tensors {
  at::Tensor de, dc, dbias, da, db;
  cce::gradients<T> out;

  gradient_tensors(const bound_problem<T>& bp, const std::array<bool, grad_count>& needs) {
    const cce::problem<T>& p = bp.p;
    const auto opts = bp.c.options();
    auto grad = [&](int slot, at::IntArrayRef shape) {
      return needs[slot] ? at::empty(shape, opts) : at::empty({0}, opts);
    };
    de = grad(grad_e, {p.n, p.d});
    dc = grad(grad_c, {p.v, p.d});
    dbias = grad(grad_bias, {bp.bias.defined() ? p.v : 0});
    da = grad(grad_a, {p.lora.rank, p.d});
    db = grad(grad_b, {p.v, p.lora.rank});
    out.de = ptr<T>(de);
    out.dc = ptr<T>(dc);
    out.dbias = ptr<T>(dbias);  // empty tensors (not asked for, or no such input) are null pointers
    out.da = ptr<T>(da);
    out.db = ptr<T>(db);
  }

  // Without rows, every class gradient is zero (the library is not called).
  void zero_class_gradients() {
    for (at::Tensor* t : {&dc, &dbias, &da, &db}) t->zero_();
  }
  backward_result tuple() const { return {de, dc, dbias, da, db}; }
};

template <class T, class Exec>
backward_result backward_op(const Exec& ex, const bound_problem<T>& bp, const cce::options& o, std::size_t budget,
                            const at::Tensor& grad_loss, const at::Tensor& saved,
                            const std::array<bool, grad_count>& needs) {
  const cce::problem<T>& p = bp.p;
  gradient_tensors<T> grads(bp, needs);
  at::Tensor g;
  if (grad_loss.numel()) {
    const std::int64_t expect = o.reduction == cce::reduction::none ? p.n : 1;
    TORCH_CHECK_VALUE(grad_loss.numel() == expect, "cce: the loss gradient has ", expect, " values");
    g = grad_loss.to(at::kFloat).contiguous();
  }
  const std::size_t ws_bytes = ex.workspace_bytes(p, budget);
  at::Tensor ws = workspace_for(ws_bytes, bp.c);
  if (p.n == 0) {
    grads.zero_class_gradients();
  } else {
    check(ex.backward(p, cce::loss_gradient{ptr<const float>(g)}, grads.out, ptr<const void>(aligned_scratch(saved)),
                      std::size_t(saved.numel()), ptr<void>(ws), ws_bytes),
          "backward");
  }
  return grads.tuple();
}

// The loss and its gradients (upstream gradient 1) in one call: the library's loss_and_grad, whose workspace of
// `budget` bytes (0: the mode's default) may keep the logits of row blocks. The saved state is scratch here.
template <class T, class Exec>
loss_and_grad_result loss_and_grad_op(const Exec& ex, const bound_problem<T>& bp, const cce::options& o,
                                      std::size_t budget, const std::array<bool, grad_count>& needs) {
  const cce::problem<T>& p = bp.p;
  const auto f32 = bp.c.options().dtype(at::kFloat);
  at::Tensor loss = o.reduction == cce::reduction::none ? at::empty({p.n}, f32) : at::empty({}, f32);
  gradient_tensors<T> grads(bp, needs);
  if (p.n == 0) {
    loss_without_rows(loss, o);
    grads.zero_class_gradients();
  } else {
    const std::size_t saved_bytes = ex.saved_bytes(p), ws_bytes = ex.workspace_bytes(p, budget);
    at::Tensor saved = workspace_for(saved_bytes, bp.c), ws = workspace_for(ws_bytes, bp.c);
    cce::forward_outputs out;
    out.loss = ptr<float>(loss);
    check(ex.loss_and_grad(p, out, grads.out, ptr<void>(saved), saved_bytes, ptr<void>(ws), ws_bytes),
          "loss_and_grad");
  }
  return std::tuple_cat(std::make_tuple(loss), grads.tuple());
}

template <class T>
struct type_tag {
  using type = T;
};

// Calls fn(type_tag<T>{}) with the cce element type of a tensor dtype.
template <class Fn>
decltype(auto) dispatch_type(at::ScalarType s, Fn&& fn) {
  switch (s) {
    case at::kBFloat16:
      return fn(type_tag<__nv_bfloat16>{});
    case at::kHalf:
      return fn(type_tag<__half>{});
    case at::kFloat:
      return fn(type_tag<float>{});
    default:
      C10_THROW_ERROR(ValueError, "cce: inputs are bfloat16, float16 or float32, not " + std::string(c10::toString(s)));
  }
}

// The operators, for an executor template Exec<T> constructed from the options (see forward_op).
template <template <class> class Exec>
forward_result forward(const at::Tensor& e, const at::Tensor& c, const at::Tensor& targets,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& b, at::IntArrayRef io,
                       at::ArrayRef<double> fo, std::int64_t outputs, std::int64_t saved_bytes) {
  const cce::options o = make_options(io, fo);
  return dispatch_type(e.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bound_problem<T> bp(e, c, targets, bias, weight, a, b, io, fo);
    return forward_op(Exec<T>(o), bp, o, outputs, saved_bytes);
  });
}

template <template <class> class Exec>
backward_result backward(const at::Tensor& grad_loss, const at::Tensor& e, const at::Tensor& c,
                         const at::Tensor& targets, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& a,
                         const std::optional<at::Tensor>& b, const at::Tensor& saved, at::IntArrayRef io,
                         at::ArrayRef<double> fo, std::array<bool, grad_count> needs) {
  const cce::options o = make_options(io, fo);
  TORCH_CHECK_VALUE(io[iopt::budget] >= 0, "cce: the workspace budget is a byte count >= 0");
  return dispatch_type(e.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bound_problem<T> bp(e, c, targets, bias, weight, a, b, io, fo);
    return backward_op(Exec<T>(o), bp, o, std::size_t(io[iopt::budget]), grad_loss, saved, needs);
  });
}

template <template <class> class Exec>
loss_and_grad_result loss_and_grad(const at::Tensor& e, const at::Tensor& c, const at::Tensor& targets,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& b,
                                   at::IntArrayRef io, at::ArrayRef<double> fo, std::array<bool, grad_count> needs) {
  const cce::options o = make_options(io, fo);
  TORCH_CHECK_VALUE(io[iopt::budget] >= 0, "cce: the workspace budget is a byte count >= 0");
  return dispatch_type(e.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bound_problem<T> bp(e, c, targets, bias, weight, a, b, io, fo);
    return loss_and_grad_op(Exec<T>(o), bp, o, std::size_t(io[iopt::budget]), needs);
  });
}

constexpr const char* forward_schema =
    "forward(Tensor e, Tensor c, Tensor targets, Tensor? bias, Tensor? weight, Tensor? lora_a, Tensor? lora_b, "
    "int[] iopt, float[] fopt, int outputs, int saved_bytes) -> "
    "(Tensor loss, Tensor lse, Tensor entropy, Tensor logprob, Tensor correct, Tensor saved)";
constexpr const char* backward_schema =
    "backward(Tensor grad_loss, Tensor e, Tensor c, Tensor targets, Tensor? bias, Tensor? weight, "
    "Tensor? lora_a, Tensor? lora_b, Tensor saved, int[] iopt, float[] fopt, bool[5] needs) -> "
    "(Tensor de, Tensor dc, Tensor dbias, Tensor da, Tensor db)";
constexpr const char* loss_and_grad_schema =
    "loss_and_grad(Tensor e, Tensor c, Tensor targets, Tensor? bias, Tensor? weight, Tensor? lora_a, "
    "Tensor? lora_b, int[] iopt, float[] fopt, bool[5] needs) -> "
    "(Tensor loss, Tensor de, Tensor dc, Tensor dbias, Tensor da, Tensor db)";

}  // namespace cce_torch
