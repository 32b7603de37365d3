// Thread-block clusters (sm_90): the CTAs of a cluster run at the same time on one GPC and reach each other's shared
// memory. The tile kernels group CTAs whose tiles share the B operand: each CTA copies a part of every B stage and the
// TMA unit multicasts it into all of them, so that the classifier crosses L2 once per cluster rather than once per CTA.
#pragma once

#include <cuda/ptx>

#include <cstdint>

#include <cce/kernel/portable/ptx.cuh>

namespace cce::detail::sm90 {

// This CTA's rank in its cluster of `Cluster` CTAs.
template <int Cluster>
__device__ __forceinline__ int cluster_rank() {
  if constexpr (Cluster == 1) {
    return 0;
  } else {
    return int(__clusterRelativeBlockRank());
  }
}

// Every thread of every CTA of the cluster (a CTA launched without one is a cluster of one): what each CTA did before
// (its barrier set-up) is visible to all after.
__device__ __forceinline__ void cluster_sync() {
  cuda::ptx::barrier_cluster_arrive(cuda::ptx::sem_release);
  cuda::ptx::barrier_cluster_wait(cuda::ptx::sem_acquire);
}

// Arrives on the mbarrier at `bar`'s offset in the shared memory of CTA `rank` of the cluster. The release is at CTA
// scope (what the arriving warp read is the stage's shared memory, which its wgmma wait already retired): a cluster-
// scope release would fence every earlier memory access of the thread.
__device__ __forceinline__ void arrive_in_cta(std::uint64_t* bar, int rank) {
  std::uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(ptx::smem_addr(bar)), "r"(rank));
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
}

// 2-D box copy (x = depth, y = rows) to `dst`'s offset in every CTA of `ctas` (a bit per rank), completing on each
// one's barrier at `bar`'s offset.
__device__ __forceinline__ void tma_multicast_2d(void* dst, const void* map, int x, int y, std::uint64_t* bar,
                                                 std::uint16_t ctas) {
  const std::int32_t coords[2] = {x, y};
  cuda::ptx::cp_async_bulk_tensor(cuda::ptx::space_cluster, cuda::ptx::space_global, dst, map, coords, bar, ctas);
}

}  // namespace cce::detail::sm90
