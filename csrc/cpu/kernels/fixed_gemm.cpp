// Fixed-order GEMM tiles for batch-invariant linear_logprobs (cpu/kernels.h FixedGemmKernels), compiled
// once per ISA. A BLAS GEMM may pick its blocking, its split of the reduction and its code path from
// the matrix shapes, the thread count and the operands' alignment, so a row's result can change with the
// rest of the batch. These tiles cannot: every output element is produced by one code path whose order
// of operations depends only on the reduction length:
//   dot : Z[i, j] = Σ_k A[i, k]·B[j, k]. Lane l of a W-lane accumulator sums k ≡ l (mod W) in ascending
//         k (the last partial vector zero-filled), then the lanes are added in a fixed pairwise order.
//         Rows and columns go in register blocks (kRows × kCols accumulators); a block that runs past the tile's edge
//         repeats its last row / column (computed, not stored), so an element never takes another path
//         because of where its row sits in the tile or how many rows the tile has.
//   axpy: Out[r, k] += Σ_s C[r, s]·B[s, k], s ascending, one lane per k (no sum across lanes). Starting
//         from Out's stored value, calls over consecutive s ranges give the same sum as one call.
// Loads are unaligned vector loads from each row's start, so no element's path depends on an address.
// The float code uses GCC vector extensions W lanes wide (16/8/4 for AVX-512/AVX2/SSE2; half for fp64):
// results are identical across rows and batches within one ISA copy, not across ISA copies.
#include <algorithm>
#include <cstring>

#include "cpu/kernels.h"
#include "cpu/vec_math.h"

#pragma GCC diagnostic ignored "-Wpsabi"

namespace rk {
namespace cpu {
namespace RK_CPU_CAPABILITY {
namespace {

#if defined(__AVX512F__)
constexpr int kBytes = 64;
#elif defined(__AVX2__)
constexpr int kBytes = 32;
#else
constexpr int kBytes = 16;
#endif

template <typename T> struct Vec {
  static constexpr int W = kBytes / static_cast<int>(sizeof(T));
  typedef T vt __attribute__((vector_size(kBytes)));
  static RK_ALWAYS_INLINE vt load(const T* p) { vt v; std::memcpy(&v, p, sizeof v); return v; }
  static RK_ALWAYS_INLINE void store(T* p, const vt& v) { std::memcpy(p, &v, sizeof v); }
  static RK_ALWAYS_INLINE vt load_n(const T* p, int64_t n) {  // the first n lanes, the rest 0
    alignas(64) T t[W] = {};
    std::memcpy(t, p, sizeof(T) * n);
    return load(t);
  }
  static RK_ALWAYS_INLINE void store_n(T* p, const vt& v, int64_t n) {
    alignas(64) T t[W];
    store(t, v);
    std::memcpy(p, t, sizeof(T) * n);
  }
  static RK_ALWAYS_INLINE T hsum(const vt& v) {  // fixed pairwise order
    T t[W];
    std::memcpy(t, &v, sizeof t);
    for (int h = W / 2; h >= 1; h /= 2)
      for (int i = 0; i < h; ++i) t[i] += t[i + h];
    return t[0];
  }
};

// Register blocks: AVX-512 has 32 vector registers, the others 16 (accumulators plus the loaded operands)
#if defined(__AVX512F__)
constexpr int kRows = 4, kCols = 4;  // dot: accumulators per block
#else
constexpr int kRows = 2, kCols = 4;
#endif

template <typename T>
void dot_tile(const T* A, const T* B, T* Z, int64_t nr, int64_t nc, int64_t H, int64_t ldz) {
  using V = Vec<T>;
  using vt = typename V::vt;
  constexpr int W = V::W;
  const int64_t full = H / W * W, tail = H - full;
  for (int64_t j0 = 0; j0 < nc; j0 += kCols) {  // a column block of B stays in L1 while the rows pass
    const T* b[kCols];
    for (int c = 0; c < kCols; ++c) b[c] = B + std::min<int64_t>(j0 + c, nc - 1) * H;
    for (int64_t i0 = 0; i0 < nr; i0 += kRows) {
      const T* a[kRows];
      for (int r = 0; r < kRows; ++r) a[r] = A + std::min<int64_t>(i0 + r, nr - 1) * H;
      vt acc[kRows][kCols] = {};
      for (int64_t k = 0; k < full; k += W) {
        vt av[kRows], bv[kCols];
        for (int r = 0; r < kRows; ++r) av[r] = V::load(a[r] + k);
        for (int c = 0; c < kCols; ++c) bv[c] = V::load(b[c] + k);
        for (int r = 0; r < kRows; ++r)
          for (int c = 0; c < kCols; ++c) acc[r][c] += av[r] * bv[c];
      }
      if (tail) {
        vt av[kRows], bv[kCols];
        for (int r = 0; r < kRows; ++r) av[r] = V::load_n(a[r] + full, tail);
        for (int c = 0; c < kCols; ++c) bv[c] = V::load_n(b[c] + full, tail);
        for (int r = 0; r < kRows; ++r)
          for (int c = 0; c < kCols; ++c) acc[r][c] += av[r] * bv[c];
      }
      for (int r = 0; r < kRows && i0 + r < nr; ++r)
        for (int c = 0; c < kCols && j0 + c < nc; ++c) Z[(i0 + r) * ldz + j0 + c] = V::hsum(acc[r][c]);
    }
  }
}

#if defined(__AVX512F__)
constexpr int kOutRows = 4, kOutVecs = 4;  // axpy: Out rows × vectors of k per block
#else
constexpr int kOutRows = 4, kOutVecs = 2;
#endif

// Out[r, k] for r < nr and k in [k0, k0 + n·W) (n ≤ kOutVecs full vectors, or one partial of `part` lanes).
template <typename T>
RK_ALWAYS_INLINE void axpy_block(const T* C, int64_t cs_r, int64_t cs_s, const T* B, T* Out, int64_t r0, int64_t nr,
                                 int64_t ns, int64_t H, int64_t k0, int64_t part) {
  using V = Vec<T>;
  using vt = typename V::vt;
  constexpr int W = V::W;
  const int nv = part ? 1 : kOutVecs;
  int64_t row[kOutRows];
  for (int r = 0; r < kOutRows; ++r) row[r] = std::min<int64_t>(r0 + r, nr - 1);
  vt acc[kOutRows][kOutVecs] = {};
  for (int r = 0; r < kOutRows; ++r)
    for (int v = 0; v < nv; ++v)
      acc[r][v] = part ? V::load_n(Out + row[r] * H + k0, part) : V::load(Out + row[r] * H + k0 + v * W);
  for (int64_t s = 0; s < ns; ++s) {
    vt bv[kOutVecs];
    for (int v = 0; v < nv; ++v) bv[v] = part ? V::load_n(B + s * H + k0, part) : V::load(B + s * H + k0 + v * W);
    for (int r = 0; r < kOutRows; ++r) {
      const vt c = vt{} + C[row[r] * cs_r + s * cs_s];
      for (int v = 0; v < nv; ++v) acc[r][v] += c * bv[v];
    }
  }
  for (int r = 0; r < kOutRows && r0 + r < nr; ++r)
    for (int v = 0; v < nv; ++v) {
      if (part) V::store_n(Out + row[r] * H + k0, acc[r][v], part);
      else V::store(Out + row[r] * H + k0 + v * W, acc[r][v]);
    }
}

template <typename T>
void axpy_tile(const T* C, int64_t cs_r, int64_t cs_s, const T* B, T* Out, int64_t nr, int64_t ns, int64_t H) {
  constexpr int W = Vec<T>::W;
  constexpr int64_t step = int64_t(kOutVecs) * W;
  // k outer: the [ns, step] panel of B stays in cache while every row block passes over it
  int64_t k0 = 0;
  for (; k0 + step <= H; k0 += step)
    for (int64_t r0 = 0; r0 < nr; r0 += kOutRows) axpy_block(C, cs_r, cs_s, B, Out, r0, nr, ns, H, k0, 0);
  for (; k0 < H; k0 += W) {  // what is left: single vectors (a k always takes the same path: it depends on H)
    const int64_t part = std::min<int64_t>(W, H - k0);
    for (int64_t r0 = 0; r0 < nr; r0 += kOutRows) axpy_block(C, cs_r, cs_s, B, Out, r0, nr, ns, H, k0, part);
  }
}

}  // namespace

extern const FixedGemmKernels fixed_gemm = {{&dot_tile<float>, &dot_tile<double>},
                                            {&axpy_tile<float>, &axpy_tile<double>}};

}  // namespace RK_CPU_CAPABILITY
}  // namespace cpu
}  // namespace rk
