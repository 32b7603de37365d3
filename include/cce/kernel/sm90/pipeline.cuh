// The producer/consumer ring of shared-memory stages that the Hopper kernels stream operands through. Each stage has
// two mbarriers: `full` completes when the TMA copies into the stage have landed (the producer arms it with the
// expected byte count), `empty` when every consumer warp has finished reading it. Both sides walk the ring in the
// same order and track the parity of the lap they are on.
#pragma once

#include <cuda/ptx>

#include <cstdint>

namespace cce::detail::sm90 {

template <int Stages>
struct ring_position {
  int stage = 0;
  std::uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == Stages) {
      stage = 0;
      phase ^= 1u;
    }
  }
};

template <int Stages>
struct stage_barriers {
  std::uint64_t full[Stages];
  std::uint64_t empty[Stages];

  // One thread, before the CTA's first barrier.
  __device__ __forceinline__ void init(std::uint32_t consumer_arrivals) {
    for (int s = 0; s < Stages; ++s) {
      cuda::ptx::mbarrier_init(&full[s], 1);
      cuda::ptx::mbarrier_init(&empty[s], consumer_arrivals);
    }
    cuda::ptx::fence_mbarrier_init(cuda::ptx::sem_release, cuda::ptx::scope_cluster);
  }
};

__device__ __forceinline__ void wait_parity(std::uint64_t* bar, std::uint32_t parity) {
  while (!cuda::ptx::mbarrier_try_wait_parity(bar, parity)) {
  }
}

// The producer waits for the stage to be free (a fresh barrier counts as freed on the first lap) and arms its `full`
// barrier with the bytes the copies will deliver.
template <int Stages>
__device__ __forceinline__ void acquire_for_write(stage_barriers<Stages>& b, const ring_position<Stages>& at,
                                                  std::uint32_t bytes) {
  wait_parity(&b.empty[at.stage], at.phase ^ 1u);
  cuda::ptx::mbarrier_arrive_expect_tx(cuda::ptx::sem_release, cuda::ptx::scope_cta, cuda::ptx::space_shared,
                                       &b.full[at.stage], bytes);
}

// 2-D box copy (x = depth, y = rows) completing on `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const void* map, int x, int y, std::uint64_t* bar) {
  const std::int32_t coords[2] = {x, y};
  cuda::ptx::cp_async_bulk_tensor(cuda::ptx::space_cluster, cuda::ptx::space_global, dst, map, coords, bar);
}

// Consumer warps: lane 0 reports the warp done with the stage.
template <int Stages>
__device__ __forceinline__ void release(stage_barriers<Stages>& b, int stage) {
  if (threadIdx.x % 32 == 0) cuda::ptx::mbarrier_arrive(&b.empty[stage]);
}

// Register budget of a warpgroup's role (setmaxnreg): the producer gives registers up, the consumers take them.
template <int Registers>
__device__ __forceinline__ void shrink_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Registers));
}
template <int Registers>
__device__ __forceinline__ void grow_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Registers));
}

}  // namespace cce::detail::sm90
