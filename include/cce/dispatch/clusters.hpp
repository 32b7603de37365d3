// Thread-block clusters on the host: a launch in clusters, and how many clusters of a kernel's launch shape the
// current device holds at once (cudaOccupancyMaxActiveClusters), for persistent grids of clusters. SMs / cluster is not
// that number: a cluster's CTAs share one GPC, and a GPC with an odd number of free SMs leaves one idle, so a grid
// sized by SMs alone would run its last clusters in a second wave. Asked once per device: the answer belongs to the
// kernel and the device, and the query is not free.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstddef>

namespace cce::detail {

// The configuration of a launch of `grid` CTAs (`threads` threads, `smem` bytes of dynamic shared memory) in
// clusters of `cluster` CTAs along x; `config` points at the cluster attribute held beside it, so it is not copied.
struct cluster_launch {
  cudaLaunchAttribute dims{};
  cudaLaunchConfig_t config{};

  cluster_launch(dim3 grid, int threads, std::size_t smem, int cluster, cudaStream_t stream = nullptr) {
    dims.id = cudaLaunchAttributeClusterDimension;
    dims.val.clusterDim.x = unsigned(cluster);
    dims.val.clusterDim.y = dims.val.clusterDim.z = 1;
    config.gridDim = grid;
    config.blockDim = dim3(unsigned(threads));
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = &dims;
    config.numAttrs = 1;
  }
  cluster_launch(const cluster_launch&) = delete;
  cluster_launch& operator=(const cluster_launch&) = delete;
};

// Launches kernel<<<grid, threads, smem, stream>>> in clusters of `cluster` CTAs along x (errors as a launch's).
template <class... Params, class... Args>
void launch_clustered(void (*kernel)(Params...), dim3 grid, int threads, std::size_t smem, int cluster,
                      cudaStream_t stream, const Args&... args) {
  const cluster_launch launch(grid, threads, smem, cluster, stream);
  cudaLaunchKernelEx(&launch.config, kernel, args...);
}

// Clusters of `cluster` CTAs of Kernel (`threads` threads, `smem` bytes of dynamic shared memory, which the kernel
// must already be allowed: allow_dynamic_smem) resident at once on the current device; `fallback` where the runtime
// cannot say. Every call for one kernel passes the same shape.
template <auto Kernel>
int resident_clusters(int cluster, int threads, std::size_t smem, int fallback) {
  static std::atomic<int> known[64];  // per device ordinal below 64; 0: not asked yet (static: zeroed)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return fallback;
  }
  std::atomic<int>* slot = device >= 0 && device < 64 ? &known[device] : nullptr;  // else ask every time
  if (slot != nullptr) {
    const int n = slot->load(std::memory_order_relaxed);
    if (n > 0) return n;
  }
  const cluster_launch shape(dim3(unsigned(cluster)), threads, smem, cluster);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, Kernel, &shape.config) != cudaSuccess || n < 1) {
    cudaGetLastError();
    return fallback;
  }
  if (slot != nullptr) slot->store(n, std::memory_order_relaxed);
  return n;
}

}  // namespace cce::detail
