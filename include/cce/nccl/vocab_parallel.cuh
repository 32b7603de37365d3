// Vocabulary-parallel cross-entropy over an NCCL communicator (docs/vocab-parallel.md). Optional: it needs
// <nccl.h> and libnccl, which the rest of cce does not.
//
//   cce::nccl::vocab_parallel<__nv_bfloat16> vp{opts, comm, offsets};   // offsets[r]: first class of rank r
//   vp.forward(p, out, d_gathered, vp.gathered_bytes(p), d_saved, ..., d_work, ..., stream);
//   vp.backward(p, {}, grads, cce::nccl::reduce::partial_gradients, d_saved, ..., d_work, ..., stream);
//
// forward = shard_forward into this rank's slot of the gathered buffer, an in-place all-gather, combine. backward
// = the shard backward, then (if asked) an all-reduce sum of the partial dE and dA, so that every rank holds the
// gradients of the whole vocabulary. Everything is enqueued on the caller's stream and communicator: no
// allocation, no host synchronisation.
#pragma once

#include <nccl.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include <cce/linear_cross_entropy.cuh>

namespace cce::nccl {

enum class reduce : int {
  none,               // each rank keeps its partial dE and dA (the caller reduces them, e.g. fused with others)
  partial_gradients,  // all-reduce (sum) dE and dA in place
};

template <class G>
ncclDataType_t data_type() {
  if constexpr (std::is_same_v<G, float>) return ncclFloat32;
  else if constexpr (std::is_same_v<G, __half>) return ncclFloat16;
  else return ncclBfloat16;
}

template <class T, class Tile = tile::default_policy_t<T>>
class vocab_parallel {
 public:
  // offsets: the first class of each rank's shard, in the communicator's rank order.
  vocab_parallel(const options& opts, ncclComm_t comm, std::vector<std::int64_t> offsets)
      : op_(opts), comm_(comm), offsets_(std::move(offsets)) {}

  const linear_cross_entropy<T, Tile>& op() const { return op_; }

  // Bytes of the buffer the statistics of every rank are gathered into.
  std::size_t gathered_bytes(const problem<T>& p) const { return op_.shard_stats_bytes(p) * offsets_.size(); }

  [[nodiscard]] status forward(const problem<T>& p, const forward_outputs& out, void* gathered,
                               std::size_t gathered_size, void* saved, std::size_t saved_size, void* workspace,
                               std::size_t workspace_size, cudaStream_t stream) const {
    int rank = 0;
    CCE_TRY(check_communicator(p, rank));
    if (gathered_size < gathered_bytes(p)) return status::workspace_too_small;
    const std::size_t stats = op_.shard_stats_bytes(p);
    auto* all = static_cast<unsigned char*>(gathered);
    unsigned char* mine = all ? all + std::size_t(rank) * stats : nullptr;
    CCE_TRY(op_.shard_forward(p, mine, stats, saved, saved_size, workspace, workspace_size, stream));
    if (ncclAllGather(mine, all, stats, ncclUint8, comm_, stream) != ncclSuccess) return status::collective_error;
    const gathered_stats g{gathered, gathered_size, offsets_.data(), int(offsets_.size())};
    return op_.combine(p, g, out, saved, saved_size, workspace, workspace_size, stream);
  }

  // dC, dBias and dB are this rank's slices; dE and dA are summed over the ranks when `mode` asks (in G: request
  // float gradients for an fp32 sum). Summing in place cannot be combined with options::accumulate (the previous
  // values would be counted once per rank).
  template <class G>
  [[nodiscard]] status backward(const problem<T>& p, loss_gradient grad, const gradients<G>& grads, reduce mode,
                                const void* saved, std::size_t saved_size, void* workspace,
                                std::size_t workspace_size, cudaStream_t stream) const {
    int rank = 0;
    CCE_TRY(check_communicator(p, rank));
    if (mode == reduce::partial_gradients) {
      if (op_.opts().accumulate) return status::invalid_option;
      if (grads.ld_de != 0 && grads.ld_de != p.d) return status::invalid_stride;  // one contiguous block to reduce
    }
    CCE_TRY(op_.backward(p, grad, grads, saved, saved_size, workspace, workspace_size, stream));
    if (mode == reduce::none) return status::success;
    bool ok = ncclGroupStart() == ncclSuccess;
    if (ok && grads.de) {
      ok = ncclAllReduce(grads.de, grads.de, std::size_t(p.n * p.d), data_type<G>(), ncclSum, comm_, stream) ==
           ncclSuccess;
    }
    if (ok && grads.da) {
      ok = ncclAllReduce(grads.da, grads.da, std::size_t(p.lora.rank * p.d), data_type<G>(), ncclSum, comm_,
                         stream) == ncclSuccess;
    }
    const bool closed = ncclGroupEnd() == ncclSuccess;
    return ok && closed ? status::success : status::collective_error;
  }

 private:
  linear_cross_entropy<T, Tile> op_;
  ncclComm_t comm_;
  std::vector<std::int64_t> offsets_;

  // The communicator has one rank per offset, and this rank's offset is the problem's.
  status check_communicator(const problem<T>& p, int& rank) const {
    int count = 0;
    if (ncclCommCount(comm_, &count) != ncclSuccess || ncclCommUserRank(comm_, &rank) != ncclSuccess) {
      return status::collective_error;
    }
    if (std::size_t(count) != offsets_.size()) return status::invalid_size;
    if (offsets_[std::size_t(rank)] != p.shard.offset) return status::invalid_size;
    return status::success;
  }
};

}  // namespace cce::nccl
