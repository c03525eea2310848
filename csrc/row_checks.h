// Host-side argument checks and helpers shared by the CPU and CUDA kernels of the [..., T] row ops
// (gae, token_rewards, masked_whiten). The Python layer validates user input; these guard the raw
// op against calls that would read out of bounds.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>

namespace rk {

// A per-position flag tensor (a mask, gae's dones) read as one byte per element, 0 or not.
inline void check_flags(const char* op, const char* name, const at::Tensor& flags, const at::Tensor& x) {
  TORCH_CHECK(flags.scalar_type() == at::kBool || flags.scalar_type() == at::kByte, op, ": ", name,
              " must be bool or uint8, got ", flags.scalar_type());
  TORCH_CHECK(flags.sizes() == x.sizes(), op, ": ", name, " must have the shape of the inputs");
  TORCH_CHECK(flags.device() == x.device(), op, ": ", name, " must be on the inputs' device");
}

inline void check_rows(const char* op, const at::Tensor& x, std::initializer_list<at::Tensor> same,
                       const at::Tensor& mask) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": expected float32 or float64, got ", x.scalar_type());
  for (const auto& t : same) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": all float inputs must share one dtype");
    TORCH_CHECK(t.sizes() == x.sizes(), op, ": all inputs must share one shape");
    TORCH_CHECK(t.device() == x.device(), op, ": all inputs must be on one device");
  }
  check_flags(op, "mask", mask, x);
}

// bool and uint8 masks are both one byte per element, 0 or not.
inline const uint8_t* mask_bytes(const at::Tensor& m) {
  return static_cast<const uint8_t*>(m.const_data_ptr());
}

// Rows per parallel task so each task has ~32k elements of work (ATen's usual grain): smaller inputs
// run inline rather than pay for waking (and waiting on) a second thread.
inline int64_t row_grain(int64_t T) { return T >= (1 << 15) ? 1 : (1 << 15) / (T > 0 ? T : 1); }

}  // namespace rk
