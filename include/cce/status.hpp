// Every public call returns a cce::status; argument errors are found on the host before any launch.
#pragma once

namespace cce {

enum class [[nodiscard]] status : int {
  success = 0,
  null_pointer,           // a required pointer is null
  invalid_size,           // N, D, V, rank or seq_len out of range
  invalid_stride,         // a leading dimension smaller than the row length
  misaligned_pointer,     // a pointer or stride breaks the vector width the kernels load with
  invalid_option,         // an option outside its domain (temperature <= 0, smoothing outside [0, 1], ...)
  workspace_too_small,    // the workspace or saved buffer is smaller than the size query returned
  unsupported_dtype,      // no kernel for this element type or target index type
  unsupported_arch,       // no kernel compiled for the device's compute capability
  invalid_target,         // device-side: a target outside [0, V) that is not ignore_index
  cuda_error,             // a CUDA runtime call failed
  collective_error,       // a collective call (cce/nccl/) failed
};

constexpr const char* to_string(status s) noexcept {
  switch (s) {
    case status::success: return "success";
    case status::null_pointer: return "a required pointer is null";
    case status::invalid_size: return "a size is out of range";
    case status::invalid_stride: return "a leading dimension is smaller than the row length";
    case status::misaligned_pointer: return "a pointer or stride is not aligned to the kernel's vector width";
    case status::invalid_option: return "an option is outside its domain";
    case status::workspace_too_small: return "the workspace or saved buffer is too small";
    case status::unsupported_dtype: return "no kernel for this element type or target index type";
    case status::unsupported_arch: return "no kernel compiled for this device's architecture";
    case status::invalid_target: return "a target is outside [0, V) and is not ignore_index";
    case status::cuda_error: return "a CUDA runtime call failed";
    case status::collective_error: return "a collective (NCCL) call failed";
  }
  return "unknown status";
}

}  // namespace cce
