// Carving one caller-provided buffer into aligned sub-buffers. The size query and the real call run the same
// carving code, so the reported size is exactly what the call uses (as CUB's alias_temporaries does).
#pragma once

#include <cstddef>
#include <cstdint>

namespace cce::detail {

class carver {
 public:
  static constexpr std::size_t alignment = 256;

  explicit carver(void* base = nullptr) : base_(static_cast<char*>(base)) {}

  // Reserves `count` objects of type U; returns the pointer (null during a size query).
  template <class U>
  U* take(std::size_t count) {
    const std::size_t offset = used_;
    used_ += (count * sizeof(U) + alignment - 1) / alignment * alignment;
    return base_ && count ? reinterpret_cast<U*>(base_ + offset) : nullptr;
  }
  std::size_t bytes() const { return used_; }

 private:
  char* base_;
  std::size_t used_ = 0;
};

}  // namespace cce::detail
