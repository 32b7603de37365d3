// What one vocabulary shard contributes to each row, in the layout the shards exchange (docs/vocab-parallel.md),
// and the combine step's merge of every shard's contribution in the order of their offsets.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include <cce/detail/math.hpp>
#include <cce/epilogue/row_partial.hpp>
#include <cce/status.hpp>
#include <cce/vocab_shard.hpp>

namespace cce {

// A shard's buffer: this header, padded to shard_rows_offset bytes, then one shard_row_stats per row.
struct shard_stats_header {
  std::int64_t offset = 0;   // the shard's first class
  std::int64_t classes = 0;  // how many classes it holds
};

struct shard_row_stats {
  row_partial partial{};     // the shard's classes except the row's target; the argmax index is a global class id
  float target_logit = 0.f;  // z_y when the shard holds the row's target, else 0
};
static_assert(sizeof(shard_row_stats) == 28, "the documented record layout");

namespace detail {

inline constexpr std::size_t shard_rows_offset = 32;

constexpr std::size_t shard_stats_bytes(std::int64_t n) {
  return std::size_t(round_up(std::int64_t(shard_rows_offset + std::size_t(n) * sizeof(shard_row_stats)), 256));
}

// A row's record from the split-merged statistics of the shard (argmax index still a shard column).
CCE_HOST_DEVICE shard_row_stats make_shard_row_stats(row_partial p, float target_logit, std::int64_t offset) {
  if (p.argmax_index >= 0) p.argmax_index += std::int32_t(offset);
  return {p, target_logit};
}

// The shards of a combine step sorted by offset: shard k holds classes [offset[k], offset[k + 1]) (the last one up
// to total) and its statistics are in gathered buffer `buffer[k]`.
struct shard_order {
  int ranks = 0;
  std::int64_t total = 0;
  std::int64_t offset[max_vocab_shards] = {};
  std::int32_t buffer[max_vocab_shards] = {};

  CCE_HOST_DEVICE std::int64_t end(int k) const { return k + 1 < ranks ? offset[k + 1] : total; }
};

// Host: the merge order of gathered buffers; the offsets must cut [0, total) into non-empty shards.
inline status make_shard_order(const gathered_stats& g, std::int64_t total, shard_order& order) {
  if (g.ranks < 1 || g.ranks > max_vocab_shards) return status::invalid_size;
  if (g.offsets == nullptr) return status::null_pointer;
  order.ranks = g.ranks;
  order.total = total;
  for (int r = 0; r < g.ranks; ++r) order.buffer[r] = r;
  std::sort(order.buffer, order.buffer + g.ranks, [&](int a, int b) { return g.offsets[a] < g.offsets[b]; });
  for (int k = 0; k < g.ranks; ++k) order.offset[k] = g.offsets[order.buffer[k]];
  if (order.offset[0] != 0) return status::invalid_size;
  for (int k = 0; k < g.ranks; ++k) {
    if (order.end(k) <= order.offset[k]) return status::invalid_size;  // empty, repeated or past the vocabulary
  }
  return status::success;
}

// The finaliser's source of rows for the combine step: every shard's record of the row, merged in offset order,
// and the target logit from the shard that holds the target. A buffer whose header disagrees with the order (the
// offsets passed do not describe the gathered data) makes the row NaN and returns false.
struct shard_rows {
  const unsigned char* data = nullptr;
  std::size_t stride = 0;  // bytes of one shard's buffer
  shard_order order{};

  CCE_HOST_DEVICE const shard_stats_header& header(int buffer) const {
    return *reinterpret_cast<const shard_stats_header*>(data + std::size_t(buffer) * stride);
  }
  CCE_HOST_DEVICE const shard_row_stats& record(int buffer, std::int64_t row) const {
    return reinterpret_cast<const shard_row_stats*>(data + std::size_t(buffer) * stride + shard_rows_offset)[row];
  }

  // target: the row's global target, -1 when it has none.
  CCE_HOST_DEVICE bool read(std::int64_t row, std::int64_t target, row_partial& merged, float& target_logit) const {
    target_logit = 0.f;
    for (int k = 0; k < order.ranks; ++k) {
      const int b = order.buffer[k];
      const shard_stats_header& h = header(b);
      if (h.offset != order.offset[k] || h.classes != order.end(k) - order.offset[k]) {
        merged = row_partial{};
        merged.softmax.max = nan_f();
        target_logit = nan_f();
        return false;
      }
      const shard_row_stats& s = record(b, row);
      merged = k == 0 ? s.partial : merge(merged, s.partial);
      if (target >= order.offset[k] && target < order.end(k)) target_logit = s.target_logit;
    }
    return true;
  }
};

}  // namespace detail
}  // namespace cce
