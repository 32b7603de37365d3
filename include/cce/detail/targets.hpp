// Which class a row is paired with: reads the target (int32 or int64), applies the shift of next-token training
// and classifies the row as kept, ignored or invalid. Invalid targets are reported, never used as an index.
// Targets are global class ids; `column` places a kept row's target in the problem's vocabulary shard.
#pragma once

#include <cstdint>

#include <cce/config.hpp>
#include <cce/options.hpp>
#include <cce/problem.hpp>

namespace cce::detail {

struct row_label {
  enum kind_t : int { kept = 0, ignored = 1, invalid = 2 };
  std::int64_t target = -1;  // in [0, V) when kept
  kind_t kind = ignored;
};

struct target_reader {
  const void* targets = nullptr;
  target_type type = target_type::int64;
  std::int64_t ignore_index = -100;
  std::int64_t classes = 0;      // of the whole vocabulary
  std::int64_t shift = 0;
  std::int64_t seq_len = 0;
  std::int64_t first_class = 0;  // the shard's classes [first_class, first_class + columns)
  std::int64_t columns = 0;
  std::int64_t first_row = 0;    // a row block's reader: its row 0 is the problem's row first_row

  CCE_HOST_DEVICE row_label operator()(std::int64_t row) const {
    row += first_row;
    std::int64_t index = row;
    if (shift > 0) {
      if (row % seq_len + shift >= seq_len) return {-1, row_label::ignored};
      index = row + shift;
    }
    const std::int64_t y = type == target_type::int32 ? std::int64_t(static_cast<const std::int32_t*>(targets)[index])
                                                      : static_cast<const std::int64_t*>(targets)[index];
    if (y == ignore_index) return {-1, row_label::ignored};
    if (y < 0 || y >= classes) return {-1, row_label::invalid};
    return {y, row_label::kept};
  }

  // The shard column of a kept row's target, or -1 (ignored, invalid, or held by another shard).
  CCE_HOST_DEVICE std::int32_t column(const row_label& label) const {
    const std::int64_t c = label.target - first_class;
    return label.kind == row_label::kept && c >= 0 && c < columns ? std::int32_t(c) : -1;
  }
};

template <class T>
target_reader make_target_reader(const problem<T>& p, const options& o) {
  return {p.targets, p.targets_type, o.ignore_index, p.total_classes(), o.shift, p.seq_len, p.shard.offset, p.v};
}

}  // namespace cce::detail
