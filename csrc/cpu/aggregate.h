// The fixed-order combine shared by the CPU loss entry points: per-row partial sums → the aggregated
// loss, the clipped fraction and the per-row token weight that backward multiplies ∂ℓ/∂x by.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "cpu/kernels.h"

namespace rk {
namespace cpu {

// Rows per parallel task of the loss kernels: ~16k tokens, at least one row.
inline int64_t loss_row_grain(int64_t n) { return std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(n, 1)); }

// Σ x / max(n, 1) in double: masked means of the stats (0 for an all-masked batch).
inline double masked_mean(double sum, int64_t n) { return sum / double(n > 0 ? n : 1); }

struct Combined {
  double loss;      // Σ_r weight[r]·sum[r], summed in row order
  double clipfrac;  // clipped tokens / valid tokens
  int64_t tokens;   // valid tokens in the batch
};

// Writes weight[r] (the weight of each valid token of row r under `agg`) and the combined loss.
// denominator > 0 replaces the divisor (the batch's valid tokens or rows with one; unused by token-sum).
template <typename T>
Combined combine(int64_t agg, const std::vector<RowPartial<T>>& part, T* weight, double denominator = 0) {
  int64_t tokens = 0, rows = 0, clipped = 0;
  for (const auto& p : part) {
    tokens += p.n;
    rows += p.n > 0;
    clipped += p.clipped;
  }
  double loss = 0;
  for (size_t r = 0; r < part.size(); ++r) {
    const T w = denominator > 0 ? aggregation_weight<T>(agg, T(part[r].n), T(denominator), T(denominator))
                                : aggregation_weight<T>(agg, T(part[r].n), T(tokens), T(rows));
    weight[r] = w;
    loss += double(w) * double(part[r].sum);
  }
  return {loss, masked_mean(double(clipped), tokens), tokens};
}

}  // namespace cpu
}  // namespace rk
