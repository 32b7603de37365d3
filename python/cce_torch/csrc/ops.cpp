// Operator definitions of the cce library namespace and their CPU kernels. On the CPU the operators run
// cce::host::tiled_executor: the GPU kernels' blockwise algorithm in plain C++, with the GPU tile shape, so
// small problems (tests, a first try) work without a GPU.
#include <torch/library.h>

#include <cce/host/tiled_executor.hpp>
#include <cce/tile/default_policy.hpp>
#include <vector>

#include "binding.hpp"

namespace cce_torch {
namespace {

template <class T>
struct cpu_exec {
  using tile = cce::tile::default_policy_t<T>;
  cce::host::tiled_executor<T> ex;
  explicit cpu_exec(const cce::options& o) : ex(o, tile::bm, tile::bn) {}

  std::size_t saved_bytes(const cce::problem<T>& p) const { return ex.saved_bytes(p); }
  std::size_t workspace_bytes(const cce::problem<T>& p, std::size_t budget) const {
    return ex.workspace_bytes(p, budget);
  }
  cce::status forward(const cce::problem<T>& p, const cce::forward_outputs& out, void* saved, std::size_t saved_size,
                      void* ws, std::size_t ws_size) const {
    return ex.forward(p, out, saved, saved_size, ws, ws_size);
  }
  cce::status backward(const cce::problem<T>& p, cce::loss_gradient g, const cce::gradients<T>& out, const void* saved,
                       std::size_t saved_size, void* ws, std::size_t ws_size) const {
    return ex.backward(p, g, out, saved, saved_size, ws, ws_size);
  }
  // The executor has no kept logits: the forward, then the backward with upstream gradient 1.
  cce::status loss_and_grad(const cce::problem<T>& p, const cce::forward_outputs& out, const cce::gradients<T>& grads,
                            void* saved, std::size_t saved_size, void* ws, std::size_t ws_size) const {
    const cce::status s = forward(p, out, saved, saved_size, ws, ws_size);
    return s != cce::status::success ? s : backward(p, cce::loss_gradient{}, grads, saved, saved_size, ws, ws_size);
  }
};

// The logit tile (rows, classes) of the default policy: the saved state holds one float per tile.
std::vector<std::int64_t> tile_shape(at::ScalarType s) {
  return dispatch_type(s, [](auto tag) {
    using tile = cce::tile::default_policy_t<typename decltype(tag)::type>;
    return std::vector<std::int64_t>{tile::bm, tile::bn};
  });
}

}  // namespace

TORCH_LIBRARY(cce, m) {
  m.def(forward_schema);
  m.def(backward_schema);
  m.def(loss_and_grad_schema);
  m.def("tile_shape(ScalarType dtype) -> int[]", &tile_shape);
}

TORCH_LIBRARY_IMPL(cce, CPU, m) {
  m.impl("forward", &forward<cpu_exec>);
  m.impl("backward", &backward<cpu_exec>);
  m.impl("loss_and_grad", &loss_and_grad<cpu_exec>);
}

}  // namespace cce_torch
