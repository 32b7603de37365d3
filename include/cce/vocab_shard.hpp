// Vocabulary-parallel (tensor-parallel classifier) descriptions: which slice of the classes a rank holds, and
// where the gathered partial statistics of every rank are. Plain host types; the steps are in docs/vocab-parallel.md.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cce {

// The slice of the vocabulary a problem holds: classes [offset, offset + problem::v) of global_v. global_v = 0
// means the problem holds the whole vocabulary (offset must then be 0).
struct vocab_shard {
  std::int64_t offset = 0;
  std::int64_t global_v = 0;
};

// The most shards a combine step merges (their order travels in the kernel's parameters).
inline constexpr int max_vocab_shards = 128;

// The partial statistics of every shard, as an all-gather leaves them: `ranks` buffers of
// linear_cross_entropy::shard_stats_bytes(problem) bytes each, back to back in `data` (device memory), and on the
// host, offsets[r] = the first class of the shard whose statistics are in buffer r. Any order of the buffers gives
// the same results, bit for bit: they are merged in the order of their offsets.
struct gathered_stats {
  const void* data = nullptr;
  std::size_t bytes = 0;                  // size of `data`, at least ranks * shard_stats_bytes
  const std::int64_t* offsets = nullptr;  // host array of `ranks` entries
  int ranks = 0;
};

}  // namespace cce
