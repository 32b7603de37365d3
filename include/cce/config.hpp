// Compiler portability: the same primitives build with nvcc (host and device) and with a plain C++17 compiler.
#pragma once

#define CCE_VERSION_MAJOR 0
#define CCE_VERSION_MINOR 1
#define CCE_VERSION_PATCH 0

#if defined(__CUDACC__)
#define CCE_HOST_DEVICE __host__ __device__ __forceinline__
#define CCE_DEVICE __device__ __forceinline__
#else
#define CCE_HOST_DEVICE inline
#endif

#if defined(__CUDA_ARCH__)
#define CCE_DEVICE_CODE 1
#else
#define CCE_DEVICE_CODE 0
#endif
