// The fixed-order combine shared by the CPU loss kernels: per-row partial sums → the aggregated loss
// and the per-row token weight that backward multiplies ∂ℓ/∂x by.
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"

namespace rk {
namespace cpu {

struct Totals {
  int64_t tokens = 0;  // valid tokens in the batch
  int64_t rows = 0;    // rows with at least one valid token
};

inline Totals count_totals(const std::vector<int64_t>& row_n) {
  Totals t;
  for (int64_t n : row_n) {
    t.tokens += n;
    t.rows += n > 0;
  }
  return t;
}

// Writes weight[r] and returns Σ_r weight[r]·row_sum[r], summed in row order in double.
template <typename T>
double combine_rows(int64_t agg, const std::vector<int64_t>& row_n, const std::vector<T>& row_sum, const Totals& tot,
                    T* weight) {
  double loss = 0;
  for (size_t r = 0; r < row_n.size(); ++r) {
    T w = aggregation_weight<T>(agg, T(row_n[r]), T(tot.tokens), T(tot.rows));
    weight[r] = w;
    loss += double(w) * double(row_sum[r]);
  }
  return loss;
}

// Σ x / max(n, 1) in double: masked means of the stats (0 for an all-masked batch).
inline double masked_mean(double sum, int64_t n) { return sum / double(n > 0 ? n : 1); }

}  // namespace cpu
}  // namespace rk
