// Loops of dpo_loss, compiled once per ISA (cpu/kernels.h): elementwise over the pairs. Backward gives
// all four input gradients in one pass: ±grad·∂loss/∂h.
#include "cpu/kernels.h"

namespace rk {
namespace cpu {
namespace RK_CPU_CAPABILITY {
namespace {

template <typename T> void fwd(const DpoArgs<T>& a, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) {
    const T dc = a.c[i] - a.cr[i], dr = a.r[i] - a.rr[i];
    a.losses[i] = rk::dpo_loss_value(dc - dr, a.beta, a.type, a.eps);
    a.c_rew[i] = a.beta * dc;
    a.r_rew[i] = a.beta * dr;
  }
}

template <typename T> void bwd(const DpoArgs<T>& a, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) {
    const T d = a.grad[i] * rk::dpo_loss_dh((a.c[i] - a.cr[i]) - (a.r[i] - a.rr[i]), a.beta, a.type, a.eps);
    a.gc[i] = d;
    a.gr[i] = -d;
    a.gcr[i] = -d;
    a.grr[i] = d;
  }
}

}  // namespace

extern const DpoKernels dpo_loss = {{&fwd<float>, &fwd<double>}, {&bwd<float>, &bwd<double>}};

}  // namespace RK_CPU_CAPABILITY
}  // namespace cpu
}  // namespace rk
