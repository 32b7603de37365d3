// The library calls that launch kernels, declared here and compiled once per element type in launch.cu. Tests call
// these instead of the member functions, so a test file compiles none of the library's kernels itself: each element
// type's kernels take minutes per architecture to build, and every GPU test would otherwise pay for them again.
// A tile policy other than the default needs an instantiation in launch.cu; without one the link fails.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <vector>

#include <cce/cce.cuh>

namespace cce::test {

template <class T, class Tile = tile::default_policy_t<T>>
status forward(const linear_cross_entropy<T, Tile>& op, const problem<T>& p, const forward_outputs& out, void* saved,
               std::size_t saved_size, void* workspace, std::size_t workspace_size, cudaStream_t stream = nullptr);

template <class T, class G, class Tile = tile::default_policy_t<T>>
status backward(const linear_cross_entropy<T, Tile>& op, const problem<T>& p, loss_gradient grad,
                const gradients<G>& grads, const void* saved, std::size_t saved_size, void* workspace,
                std::size_t workspace_size, cudaStream_t stream = nullptr);

template <class T, class G, class Tile = tile::default_policy_t<T>>
status loss_and_grad(const linear_cross_entropy<T, Tile>& op, const problem<T>& p, const forward_outputs& out,
                     const gradients<G>& grads, void* saved, std::size_t saved_size, void* workspace,
                     std::size_t workspace_size, cudaStream_t stream = nullptr);

template <class T, class Tile = tile::default_policy_t<T>>
status shard_forward(const linear_cross_entropy<T, Tile>& op, const problem<T>& p, void* stats, std::size_t stats_size,
                     void* saved, std::size_t saved_size, void* workspace, std::size_t workspace_size,
                     cudaStream_t stream = nullptr);

template <class T, class Tile = tile::default_policy_t<T>>
status combine(const linear_cross_entropy<T, Tile>& op, const problem<T>& p, const gathered_stats& gathered,
               const forward_outputs& out, void* saved, std::size_t saved_size, void* workspace,
               std::size_t workspace_size, cudaStream_t stream = nullptr);

// Attributes of the bf16 portable forward kernel (default policy, vectorized loads) on the current device.
cudaFuncAttributes portable_forward_attributes();

// Local-memory bytes of the bf16 sm_90a kernels (forward, dlogit, the dE and dC products, the persistent products with
// bf16 and fp32 gradients); empty when this build has no sm_90a image of them or the device is not compute
// capability 9.0.
std::vector<std::size_t> sm90_local_bytes();

}  // namespace cce::test
