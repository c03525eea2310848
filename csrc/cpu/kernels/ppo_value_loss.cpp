// Loops of ppo_value_loss, compiled once per ISA (cpu/kernels.h). Forward: each row's loss sum, valid
// and clipped counts, reduced in a fixed (compile-time) order. Backward: one pass. Masked positions are
// selected away (never multiplied by 0), so garbage/inf there cannot leak NaN.
#include <algorithm>

#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace rk {
namespace cpu {
namespace RK_CPU_CAPABILITY {
namespace {

constexpr int64_t kTile = 256;  // tokens per buffered tile of the forward

// Per tile: an elementwise loop writes each token's terms to small buffers, then plain sums reduce them.
template <typename T>
RK_ALWAYS_INLINE void row_forward(const T* val, const T* old, const T* ret, const uint8_t* m, int64_t len, T clip,
                                  RowPartial<T>& out) {
  alignas(64) T loss_buf[kTile];
  alignas(64) int32_t n_buf[kTile], clip_buf[kTile];
  for (int64_t t0 = 0; t0 < len; t0 += kTile) {
    const int64_t n = std::min(kTile, len - t0);
    const T *a = val + t0, *b = old + t0, *r = ret + t0;
    const uint8_t* v = m + t0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const auto tok = rk::ppo_value_token(a[i], b[i], r[i], clip);
      const int32_t valid = v[i] != 0;
      loss_buf[i] = valid ? tok.loss : T(0);
      n_buf[i] = valid;
      clip_buf[i] = tok.clipped & valid;
    }
    T s = 0;
    int32_t nv = 0, nc = 0;
#pragma omp simd reduction(+ : s, nv, nc)
    for (int64_t i = 0; i < n; ++i) {
      s += loss_buf[i];
      nv += n_buf[i];
      nc += clip_buf[i];
    }
    out.sum += s;
    out.n += nv;
    out.clipped += nc;
  }
}

template <typename T>
RK_ALWAYS_INLINE void row_backward(const T* val, const T* old, const T* ret, const uint8_t* m, int64_t len, T clip,
                                   T scale, T* g_v, T* g_old, T* g_ret) {
  if (g_old == nullptr) {
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const auto tok = rk::ppo_value_token(val[t], old[t], ret[t], clip);
      g_v[t] = m[t] ? scale * tok.dloss : T(0);
    }
  } else {
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const auto tok = rk::ppo_value_token(val[t], old[t], ret[t], clip);
      g_v[t] = m[t] ? scale * tok.dloss : T(0);
      g_old[t] = m[t] ? scale * (tok.err - tok.dloss) : T(0);
      g_ret[t] = m[t] ? -scale * tok.err : T(0);
    }
  }
}

template <typename T> void fwd_rows(const ValueArgs<T>& a, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t o = r * a.n;
    row_forward(a.values + o, a.old + o, a.ret + o, a.mask + o, a.n, a.clip, a.part[r]);
  }
}

template <typename T> void bwd_rows(const ValueArgs<T>& a, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t o = r * a.n;
    row_backward(a.values + o, a.old + o, a.ret + o, a.mask + o, a.n, a.clip, a.grad * a.row_weight[r],
                 a.g_values + o, a.g_old ? a.g_old + o : nullptr, a.g_ret ? a.g_ret + o : nullptr);
  }
}

}  // namespace

extern const ValueLossKernels ppo_value_loss = {{&fwd_rows<float>, &fwd_rows<double>},
                                                {&bwd_rows<float>, &bwd_rows<double>}};

}  // namespace RK_CPU_CAPABILITY
}  // namespace cpu
}  // namespace rk
