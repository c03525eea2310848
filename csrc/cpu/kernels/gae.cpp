// Loops of gae, compiled once per ISA (cpu/kernels.h): one reverse scan per row.
#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace rk {
namespace cpu {
namespace RK_CPU_CAPABILITY {
namespace {

// Branch-free: the step is computed at every position and kept only where the mask is set, so rows with
// random holes cost no mispredictions (and garbage at masked positions never reaches a result).
// kDones is a template flag so that rows without dones keep the loop they had before dones existed.
template <bool kDones, typename T>
void gae_row(const T* r, const T* v, const uint8_t* m, const uint8_t* d, T* adv, T* ret, int64_t n, T gamma,
             T lam) {
  T next_v = 0, next_a = 0;
  for (int64_t t = n - 1; t >= 0; --t) {
    T nv = next_v, na = next_a;
    const T a = rk::gae_step(r[t], v[t], kDones && d[t] != 0, gamma, lam, nv, na);
    const bool valid = m[t] != 0;
    next_v = valid ? nv : next_v;
    next_a = valid ? na : next_a;
    adv[t] = rk::select_bits(m[t], a);
    ret[t] = rk::select_bits(m[t], a + v[t]);
  }
}

template <typename T> void rows(const GaeArgs<T>& a, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t o = i * a.n;
    if (a.dones) gae_row<true>(a.r + o, a.v + o, a.mask + o, a.dones + o, a.adv + o, a.ret + o, a.n, a.gamma, a.lam);
    else gae_row<false>(a.r + o, a.v + o, a.mask + o, a.mask, a.adv + o, a.ret + o, a.n, a.gamma, a.lam);
  }
}

}  // namespace

extern const GaeKernels gae = {{&rows<float>, &rows<double>}};

}  // namespace RK_CPU_CAPABILITY
}  // namespace cpu
}  // namespace rk
