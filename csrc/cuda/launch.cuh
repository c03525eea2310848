// Launch helpers shared by the CUDA kernels (device-side only; the math is in common.h).
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cstdint>

namespace rk {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t global_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// Enough blocks to cover n with grid-stride loops, capped so the grid size always fits.
inline unsigned blocks_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

}  // namespace rk

// The token-level ops take fp32 or fp64 (the Python layer casts bf16/fp16 to fp32).
#define RK_DISPATCH_FLOAT_DOUBLE(dtype, ...)                                          \
  do {                                                                                \
    auto _f = __VA_ARGS__;                                                            \
    if ((dtype) == c10::ScalarType::Float) {                                          \
      _f(float{});                                                                    \
    } else if ((dtype) == c10::ScalarType::Double) {                                  \
      _f(double{});                                                                   \
    } else {                                                                          \
      TORCH_CHECK(false, "rlhf_kernels: expected float32 or float64, got ", (dtype)); \
    }                                                                                 \
  } while (0)
