// How the CPU entry points cut their work for at::parallel_for.
#pragma once
#include <cstdint>

namespace rk {
namespace cpu {

// Rows per parallel task so each task has ~32k elements of work (ATen's usual grain): smaller inputs
// run inline rather than pay for waking (and waiting on) a second thread.
inline int64_t row_grain(int64_t n) { return n >= (1 << 15) ? 1 : (1 << 15) / (n > 0 ? n : 1); }

}  // namespace cpu
}  // namespace rk
