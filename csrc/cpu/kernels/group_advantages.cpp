// Loops of group_advantages, compiled once per ISA (cpu/kernels.h): each group is read three times in member
// order (sum, squared deviations, advantages) while it sits in cache, so the result does not depend on the
// thread count or the ISA's vector width.
#include "cpu/kernels.h"

namespace rk {
namespace cpu {
namespace RK_CPU_CAPABILITY {
namespace {

template <typename T, typename Index>
void group(const T* s, T* out, int64_t n, Index at, int64_t baseline, int64_t scale, T eps) {
  T sum = 0;
  for (int64_t p = 0; p < n; ++p) sum += s[at(p)];
  const T mean = sum / T(n);
  T m2 = 0;
  if (scale == rk::SCALE_STD) {
    for (int64_t p = 0; p < n; ++p) {
      const T d = s[at(p)] - mean;
      m2 += d * d;
    }
  }
  const rk::GroupAffine<T> f = rk::group_affine(n, mean, m2, baseline, scale, eps);
  for (int64_t p = 0; p < n; ++p) out[at(p)] = (s[at(p)] - f.shift) * f.mult;
}

template <typename T> GroupStatus groups(const GroupArgs<T>& a, int64_t lo, int64_t hi) {
  if (a.order == nullptr) {
    const int64_t g = a.group_size;
    for (int64_t k = lo; k < hi; ++k)
      group(a.scores + k * g, a.out + k * g, g, [](int64_t p) { return p; }, a.baseline, a.scale, a.eps);
    return GroupStatus::ok;
  }
  // labelled: every index is checked before it is read, since order and offsets come from the caller
  for (int64_t k = lo; k < hi; ++k) {
    const int64_t start = a.offsets[k], end = a.offsets[k + 1];
    if (!(0 <= start && start <= end && end <= a.B)) return GroupStatus::bad_offsets;
    if (start == end) continue;
    const int64_t* members = a.order + start;
    for (int64_t p = 0; p < end - start; ++p)
      if (!(0 <= members[p] && members[p] < a.B)) return GroupStatus::bad_order;
    group(a.scores, a.out, end - start, [members](int64_t p) { return members[p]; }, a.baseline, a.scale, a.eps);
  }
  return GroupStatus::ok;
}

}  // namespace

extern const GroupAdvantagesKernels group_advantages = {{&groups<float>, &groups<double>}};

}  // namespace RK_CPU_CAPABILITY
}  // namespace cpu
}  // namespace rk
