// Addressing the rows of a [..., V] tensor whose last dim is contiguous and whose leading dims have any
// strides (e.g. logits[:, :-1] of a [B, T, V] tensor), without copying it. Shared by CPU and CUDA kernels.
#pragma once
#include <cstdint>

#include "common.h"

namespace rk {

struct RowIndex {
  static constexpr int kMaxDims = 6;
  int nd = 0;  // leading dims left after merging neighbours that are contiguous with each other
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};

  // Element offset of row r (0 ≤ r < Π sizes), in int64 throughout.
  RK_HD int64_t offset(int64_t r) const {
    int64_t off = 0;
    for (int k = nd - 1; k >= 0; --k) {
      off += (r % sizes[k]) * strides[k];
      r /= sizes[k];
    }
    return off;
  }
};

// Merge the leading dims of a tensor with `dim` dims; false when more than kMaxDims groups remain
// (the caller then makes the tensor contiguous, which always fits).
inline bool make_row_index(const int64_t* sizes, const int64_t* strides, int64_t dim, RowIndex& out) {
  RowIndex ri;
  for (int64_t d = 0; d + 1 < dim; ++d) {
    if (sizes[d] == 1) continue;
    if (ri.nd > 0 && ri.strides[ri.nd - 1] == strides[d] * sizes[d]) {
      ri.sizes[ri.nd - 1] *= sizes[d];
      ri.strides[ri.nd - 1] = strides[d];
    } else {
      if (ri.nd == RowIndex::kMaxDims) return false;
      ri.sizes[ri.nd] = sizes[d];
      ri.strides[ri.nd] = strides[d];
      ++ri.nd;
    }
  }
  out = ri;
  return true;
}

}  // namespace rk
