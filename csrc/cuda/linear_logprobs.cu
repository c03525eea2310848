// CUDA kernels of rlhf_kernels::linear_logprobs_{fwd,bwd}: chunked cuBLAS GEMMs (through ATen) on
// row × vocabulary chunks plus fused kernels over each logits chunk; no [N, V] buffer.
//
// A chunk holds Nc × Vc logits in the accumulation type (fp32, fp64 for fp64 inputs), sized by
// rk::linear_plan_cuda (linear_logprobs_plan.h) so that all of the pass's temporaries (the chunk, its
// low-precision copy, the fp32 d(W)/d(hidden) GEMM partials, the per-row state) fit in `chunk_bytes`.
// Chunks run in a fixed order on the current stream (vocabulary outer, rows inner):
//   forward : Z = h_r · W_cᵀ; one block per row folds the chunk into that row's online
//             log-sum-exp + entropy state (rk::LseState, a fixed-order tree merge in shared memory)
//             and picks the target logit; a last kernel turns the states into logp, entropy, lse.
//   backward: Z recomputed and turned in place into d(logits) by rk::logprob_entropy_grad / T
//             (0 on ignored rows); d(hidden)_r += dZ · W_c; d(W_c) += dZᵀ · h_r; d(b_c) += column
//             sums of dZ (at::sum_out: a tree reduction over the rows, fixed for a given shape).
//             No atomics: deterministic.
// bf16/fp16: the GEMMs take the inputs as they are and write fp32 (mm with out_dtype); d(logits)
// is rounded to the input dtype for the two gradient GEMMs (as tensor-core kernels do), and the
// gradients accumulate in fp32 before the final cast.
//
// batch_invariant=True: a row's logp, entropy and d(hidden) row must not depend on the rest of the batch.
// cuBLAS picks its algorithm (tiles, split-K) from the shapes, so the chunk's GEMMs, whose row count
// follows N, could change a row's bits. In this mode every product runs in fixed_gemm_kernel
// (cuda/fixed_gemm.cuh) instead: one thread per output element, its sum over k in ascending order with one
// fma per term (the operand tiles go through shared memory, which changes no arithmetic), so an element's
// result depends only on its own row and column. The vocabulary chunk width is fixed (kInvariantVc, a
// function of nothing), so a row's fold of chunk states (lse_chunk_kernel: thread-strided, then a fixed
// tree) depends on V alone.
// d(hidden) accumulates in the [N, H] fp32/fp64 buffer chunk after chunk, continuing the same sum over the vocabulary
// in ascending order; d(logits) enters it unrounded. The d(W) and d(b) sums over rows follow the row chunks:
// deterministic for a given batch. It is much slower than cuBLAS (a plain SIMT GEMM, no tensor cores);
// the triton backend's batch-invariant mode keeps the tensor-core tiles.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "checks.h"
#include "common.h"
#include "linear_logprobs_plan.h"
#include "cuda/fixed_gemm.cuh"
#include "cuda/launch.cuh"

namespace {

constexpr int kRowThreads = 256;  // threads per row block (power of two for the tree merge)
constexpr int64_t kInvariantVc = 4096;  // batch_invariant: vocabulary entries per chunk, whatever N is
constexpr int64_t kInvariantNc = 1024;  // batch_invariant: rows per chunk (any value gives the same rows)

inline unsigned row_blocks(int64_t nr) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(nr, 1), 65535));
}

template <typename T>
__global__ void lse_init_kernel(T* m, T* s, T* w, T* tgt, int64_t n) {
  for (int64_t i = rk::global_index(); i < n; i += rk::grid_stride()) {
    m[i] = -rk::r_inf<T>();
    s[i] = T(0);
    w[i] = T(0);
    tgt[i] = T(0);
  }
}

// The softcap cap(y) = c·tanh(y/c) (c = 0: none) and its slope 1 − (cap/c)².
template <typename T> __device__ __forceinline__ T capped(T y, T c) { return c > T(0) ? c * tanh(y / c) : y; }
template <typename T> __device__ __forceinline__ T cap_slope(T capv, T c) {
  if (c <= T(0)) return T(1);
  const T u = capv / c;
  return T(1) - u * u;
}

// One block per row: fold the chunk's z = cap(x + b)·inv_t[r] into the row's running state.
template <typename T>
__global__ void lse_chunk_kernel(const T* __restrict__ z, int64_t nr, int64_t vc, int64_t v0,
                                 const T* __restrict__ bias, const T* __restrict__ inv_t, T softcap,
                                 const int64_t* __restrict__ tok, T* m, T* s, T* w, T* tgt) {
  __shared__ rk::LseState<T> sh[kRowThreads];
  for (int64_t r = blockIdx.x; r < nr; r += gridDim.x) {
    const T* zr = z + r * vc;
    const int64_t t = tok[r] - v0;
    const T it = inv_t[r];
    rk::LseState<T> st = rk::lse_init<T>();
    for (int64_t j = threadIdx.x; j < vc; j += blockDim.x) {
      T v = capped(zr[j] + (bias ? bias[j] : T(0)), softcap) * it;
      rk::lse_push(st, v);
      if (j == t) tgt[r] += v;  // tgt starts at 0 and exactly one chunk holds the token
    }
    sh[threadIdx.x] = st;
    __syncthreads();
    for (int stride = kRowThreads / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) sh[threadIdx.x] = rk::lse_merge(sh[threadIdx.x], sh[threadIdx.x + stride]);
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      rk::LseState<T> run{m[r], s[r], w[r]};
      run = rk::lse_merge(run, sh[0]);
      m[r] = run.m;
      s[r] = run.s;
      w[r] = run.w;
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void lse_finish_kernel(const T* m, const T* s, const T* w, const T* tgt, const int64_t* tok, int64_t n,
                                  int64_t V, int64_t ignore_index, T* logp, T* ent, T* lse) {
  for (int64_t i = rk::global_index(); i < n; i += rk::grid_stride()) {
    rk::LseState<T> st{m[i], s[i], w[i]};
    const T l = rk::lse_value(st);
    const int64_t t = tok[i];
    const bool valid = t != ignore_index;
    lse[i] = l;
    logp[i] = !valid ? T(0) : (t >= 0 && t < V ? tgt[i] - l : rk::r_nan<T>());
    ent[i] = valid ? rk::lse_entropy(st) : T(0);
  }
}

// z (nr × vc, in place) -> d(logits); `low` (optional) receives the same values in the input dtype.
template <typename T, typename L>
__global__ void dlogits_kernel(T* z, L* low, int64_t nr, int64_t vc, int64_t v0, const T* __restrict__ bias,
                               const T* __restrict__ inv_t, T softcap, const int64_t* __restrict__ tok, const T* __restrict__ lse, const T* __restrict__ ent,
                               const T* __restrict__ g_lp, const T* __restrict__ g_h, int64_t ignore_index,
                               int64_t V) {
  const int64_t n = nr * vc;
  for (int64_t i = rk::global_index(); i < n; i += rk::grid_stride()) {
    const int64_t r = i / vc, j = i - r * vc;
    const int64_t t = tok[r];
    const bool valid = t != ignore_index;
    // an out-of-range token (validate=False) has logp = NaN and, as in the reference, no logp gradient
    const T g1 = valid && t >= 0 && t < V ? g_lp[r] : T(0);
    const T g2 = valid && g_h ? g_h[r] : T(0);
    T d = T(0);
    if (g1 != T(0) || g2 != T(0)) {
      const T y = capped(z[i] + (bias ? bias[j] : T(0)), softcap);
      d = rk::logprob_entropy_grad(y * inv_t[r], lse[r], ent[r], t - v0 == j, g1, g2) * inv_t[r] *
          cap_slope(y, softcap);
    }
    z[i] = d;
    if (low) low[i] = static_cast<L>(d);
  }
}

constexpr int64_t kDefaultBudget = int64_t(256) << 20;

rk::LinearPlan make_plan(const at::Tensor& hidden, const at::Tensor& weight, int64_t budget, bool backward,
                         bool need_h, bool need_w, bool need_b, bool invariant) {
  const int64_t acc = hidden.scalar_type() == at::kDouble ? 8 : 4;
  const int64_t store = static_cast<int64_t>(hidden.element_size());
  if (invariant) {  // a chunk width that does not follow N (the budget is not consulted)
    rk::LinearPlan p;
    p.nc = std::min<int64_t>(std::max<int64_t>(hidden.size(0), 1), kInvariantNc);
    p.vc = std::min<int64_t>(weight.size(0), kInvariantVc);
    p.chunks = (weight.size(0) + p.vc - 1) / p.vc;
    return p;
  }
  return rk::linear_plan_cuda({hidden.size(0), weight.size(0), hidden.size(1), acc, store, backward, need_h, need_w,
                               need_b, budget > 0 ? budget : kDefaultBudget, 1});
}

bool is_low(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf; }

// 1/temperature per row [N] in the accumulation dtype (further per-row settings would travel the same way).
at::Tensor inverse_temperatures(const c10::optional<at::Tensor>& temps, double temperature, int64_t N,
                                const at::TensorOptions& opts) {
  if (temps && temps->defined()) return temps->reciprocal();
  return at::full({N}, temperature, opts).reciprocal_();
}

// z = h_r · W_cᵀ in the accumulation dtype (fp32 output straight from bf16/fp16 operands).
void logits_gemm(at::Tensor& z, const at::Tensor& hr, const at::Tensor& w, bool low) {
  if (low) at::mm_out(z, hr, w.t(), at::kFloat);
  else at::mm_out(z, hr, w.t());
}

// batch_invariant: z[nr, vc] = h[r0 : r0 + nr] · W[v0 : v0 + vc]ᵀ with fixed_gemm_kernel (any input dtype).
template <typename T>
void invariant_logits(at::Tensor& z, const at::Tensor& hidden, int64_t r0, int64_t nr, const at::Tensor& weight,
                      int64_t v0, int64_t vc, cudaStream_t stream) {
  const int64_t H = hidden.size(1);
  auto run = [&](auto tag) {
    using S = decltype(tag);
    rk::fixed_gemm<T, S, S>(static_cast<const S*>(hidden.const_data_ptr()) + r0 * H, H, 1,
                            static_cast<const S*>(weight.const_data_ptr()) + v0 * H, 1, H, z.mutable_data_ptr<T>(), vc,
                            nr, vc, H, false, stream);
  };
  switch (hidden.scalar_type()) {
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: run(T{}); break;
  }
}

template <typename T>
void fwd_impl(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
              const at::Tensor& tokens, double temperature, int64_t ignore_index, int64_t budget, at::Tensor& logp,
              at::Tensor& ent, at::Tensor& lse, const c10::optional<at::Tensor>& temps, double softcap, bool invariant) {
  const int64_t N = hidden.size(0), V = weight.size(0);
  const bool low = is_low(hidden);
  auto opts = logp.options();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const rk::LinearPlan c = make_plan(hidden, weight, budget, false, false, false, false, invariant);
  at::Tensor state = at::empty({4, N}, opts);  // m, s, w, target logit
  T* m = state[0].mutable_data_ptr<T>();
  T* s = state[1].mutable_data_ptr<T>();
  T* w = state[2].mutable_data_ptr<T>();
  T* tgt = state[3].mutable_data_ptr<T>();
  lse_init_kernel<T><<<rk::blocks_for(N), rk::kThreads, 0, stream>>>(m, s, w, tgt, N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor zbuf = at::empty({c.nc * c.vc}, opts);
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  const T* b = bias ? bias->const_data_ptr<T>() : nullptr;
  const at::Tensor inv_buf = inverse_temperatures(temps, temperature, N, opts);
  const T* inv_t = inv_buf.const_data_ptr<T>();
  for (int64_t v0 = 0; v0 < V; v0 += c.vc) {
    const int64_t vc = std::min(c.vc, V - v0);
    const at::Tensor wc = weight.narrow(0, v0, vc);
    for (int64_t r0 = 0; r0 < N; r0 += c.nc) {
      const int64_t nr = std::min(c.nc, N - r0);
      at::Tensor z = zbuf.narrow(0, 0, nr * vc).view({nr, vc});
      if (invariant)
        invariant_logits<T>(z, hidden, r0, nr, weight, v0, vc, stream);
      else
        logits_gemm(z, hidden.narrow(0, r0, nr), wc, low);
      lse_chunk_kernel<T><<<row_blocks(nr), kRowThreads, 0, stream>>>(
          z.const_data_ptr<T>(), nr, vc, v0, b ? b + v0 : nullptr, inv_t + r0, static_cast<T>(softcap), tok + r0,
          m + r0, s + r0, w + r0, tgt + r0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  lse_finish_kernel<T><<<rk::blocks_for(N), rk::kThreads, 0, stream>>>(
      m, s, w, tgt, tok, N, V, ignore_index, logp.mutable_data_ptr<T>(), ent.mutable_data_ptr<T>(),
      lse.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                                                                   const c10::optional<at::Tensor>& bias,
                                                                   const at::Tensor& tokens, double temperature,
                                                                   int64_t ignore_index, int64_t chunk_bytes,
                                                                   const c10::optional<at::Tensor>& temps,
                                                                   double softcap, bool batch_invariant) {
  rk::check_linear_logprobs(hidden, weight, bias, tokens);
  rk::check_head_options("linear_logprobs", temps, softcap, rk::accumulation_type(hidden), hidden.size(0), hidden);
  c10::cuda::CUDAGuard guard(hidden.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the inner GEMMs are not part of any graph
  const bool dbl = hidden.scalar_type() == at::kDouble;
  auto opts = hidden.options().dtype(dbl ? at::kDouble : at::kFloat);
  const int64_t N = hidden.size(0);
  at::Tensor logp = at::empty({N}, opts), ent = at::empty({N}, opts), lse = at::empty({N}, opts);
  if (N == 0) return {logp, ent, lse};
  if (dbl)
    fwd_impl<double>(hidden, weight, bias, tokens, temperature, ignore_index, chunk_bytes, logp, ent, lse, temps,
                     softcap, batch_invariant);
  else
    fwd_impl<float>(hidden, weight, bias, tokens, temperature, ignore_index, chunk_bytes, logp, ent, lse, temps,
                    softcap, batch_invariant);
  return {logp, ent, lse};
}

template <typename T, typename L>
void bwd_impl(const at::Tensor& glp, const at::Tensor& gent, const at::Tensor& hidden, const at::Tensor& weight,
              const c10::optional<at::Tensor>& bias, const at::Tensor& tokens, const at::Tensor& lse,
              const at::Tensor& entropy, double temperature, int64_t ignore_index, int64_t budget, at::Tensor& dh,
              at::Tensor& grad_w, at::Tensor& grad_b, const c10::optional<at::Tensor>& temps, double softcap,
              bool invariant) {
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  constexpr bool kLow = !std::is_same_v<L, T>;
  auto opts = lse.options();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool need_h = dh.defined(), need_w = grad_w.defined(), need_b = grad_b.defined();
  const rk::LinearPlan c = make_plan(hidden, weight, budget, true, need_h, need_w, need_b, invariant);
  const bool rows_split = N > c.nc;
  at::Tensor zbuf = at::empty({c.nc * c.vc}, opts);
  at::Tensor lowbuf = kLow && !invariant ? at::empty({c.nc * c.vc}, hidden.options()) : at::Tensor();
  // low precision: the weight-gradient chunk accumulates in fp32 before its cast into grad_w
  at::Tensor dwacc = kLow && need_w ? at::empty({c.vc, H}, opts) : at::Tensor();
  at::Tensor dwtmp = kLow && need_w && rows_split ? at::empty({c.vc, H}, opts) : at::Tensor();
  at::Tensor dhtmp = kLow && need_h ? at::empty({c.nc, H}, opts) : at::Tensor();
  at::Tensor dbtmp = need_b && rows_split ? at::empty({c.vc}, opts) : at::Tensor();
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  const T* b = bias ? bias->const_data_ptr<T>() : nullptr;
  const T* g2 = gent.defined() ? gent.const_data_ptr<T>() : nullptr;
  const at::Tensor inv_buf = inverse_temperatures(temps, temperature, N, opts);
  const T* inv_t = inv_buf.const_data_ptr<T>();
  for (int64_t v0 = 0; v0 < V; v0 += c.vc) {
    const int64_t vc = std::min(c.vc, V - v0);
    const at::Tensor wc = weight.narrow(0, v0, vc);
    at::Tensor dw;
    if (need_w) dw = kLow ? dwacc.narrow(0, 0, vc) : grad_w.narrow(0, v0, vc);
    for (int64_t r0 = 0; r0 < N; r0 += c.nc) {
      const int64_t nr = std::min(c.nc, N - r0);
      at::Tensor z = zbuf.narrow(0, 0, nr * vc).view({nr, vc});
      const at::Tensor hr = hidden.narrow(0, r0, nr);
      if (invariant)
        invariant_logits<T>(z, hidden, r0, nr, weight, v0, vc, stream);
      else
        logits_gemm(z, hr, wc, kLow);
      at::Tensor zl = kLow && !invariant ? lowbuf.narrow(0, 0, nr * vc).view({nr, vc}) : z;
      dlogits_kernel<T, L><<<rk::blocks_for(nr * vc), rk::kThreads, 0, stream>>>(
          z.mutable_data_ptr<T>(), kLow && !invariant ? zl.mutable_data_ptr<L>() : nullptr, nr, vc, v0, b ? b + v0 : nullptr,
          inv_t + r0, static_cast<T>(softcap), tok + r0, lse.const_data_ptr<T>() + r0, entropy.const_data_ptr<T>() + r0,
          glp.const_data_ptr<T>() + r0, g2 ? g2 + r0 : nullptr, ignore_index, V);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_b) {
        const int64_t rows_dim[] = {0};
        at::Tensor dbc = grad_b.narrow(0, v0, vc);
        if (r0 == 0) {
          at::sum_out(dbc, z, rows_dim);
        } else {
          at::Tensor t = dbtmp.narrow(0, 0, vc);
          at::sum_out(t, z, rows_dim);
          dbc.add_(t);
        }
      }
      if (invariant) {  // d(hidden) continues each row's sum over the vocabulary; d(W) sums the row chunks in order
        const L* hp = static_cast<const L*>(hidden.const_data_ptr());
        const L* wp = static_cast<const L*>(weight.const_data_ptr());
        const T* zp = z.const_data_ptr<T>();
        if (need_h)
          rk::fixed_gemm<T, T, L>(zp, vc, 1, wp + v0 * H, H, 1, dh.mutable_data_ptr<T>() + r0 * H, H, nr, H, vc, true,
                                  stream);
        if (need_w)
          rk::fixed_gemm<T, T, L>(zp, 1, vc, hp + r0 * H, H, 1, dw.mutable_data_ptr<T>(), H, vc, H, nr, r0 != 0, stream);
        continue;
      }
      if (need_h) {
        at::Tensor dhr = dh.narrow(0, r0, nr);
        if (kLow) {
          at::Tensor t = dhtmp.narrow(0, 0, nr);
          at::mm_out(t, zl, wc, at::kFloat);
          dhr.add_(t);
        } else {
          dhr.addmm_(z, wc);
        }
      }
      if (need_w) {
        if (kLow) {
          at::Tensor t = r0 == 0 ? dw : dwtmp.narrow(0, 0, vc);
          at::mm_out(t, zl.t(), hr, at::kFloat);
          if (r0 != 0) dw.add_(t);
        } else if (r0 == 0) {
          at::mm_out(dw, z.t(), hr);
        } else {
          dw.addmm_(z.t(), hr);
        }
      }
    }
    if (need_w && kLow) grad_w.narrow(0, v0, vc).copy_(dw);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd(
    const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& tokens, const at::Tensor& lse,
    const at::Tensor& entropy, double temperature, int64_t ignore_index, bool need_h, bool need_w, bool need_b,
    int64_t chunk_bytes, const c10::optional<at::Tensor>& temps, double softcap, bool batch_invariant) {
  rk::check_linear_logprobs_bwd(grad_logp, grad_entropy, hidden, weight, bias, tokens, lse, entropy, need_b);
  rk::check_head_options("linear_logprobs_bwd", temps, softcap, rk::accumulation_type(hidden), hidden.size(0), hidden);
  c10::cuda::CUDAGuard guard(hidden.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  auto opts = lse.options();
  at::Tensor dh = need_h ? at::zeros({N, H}, opts) : at::Tensor();
  at::Tensor grad_w = need_w ? (N == 0 ? at::zeros({V, H}, weight.options()) : at::empty({V, H}, weight.options()))
                             : at::Tensor();
  at::Tensor grad_b = need_b ? at::zeros({V}, opts) : at::Tensor();
  if (N > 0 && (need_h || need_w || need_b)) {
    const at::Tensor glp = grad_logp.to(lse.scalar_type()).contiguous();
    const at::Tensor gent = grad_entropy ? grad_entropy->to(lse.scalar_type()).contiguous() : at::Tensor();
    const int64_t budget = chunk_bytes > 0 ? chunk_bytes : kDefaultBudget;
    switch (hidden.scalar_type()) {
      case at::kDouble:
        bwd_impl<double, double>(glp, gent, hidden, weight, bias, tokens, lse, entropy, temperature, ignore_index,
                                 budget, dh, grad_w, grad_b, temps, softcap, batch_invariant);
        break;
      case at::kFloat:
        bwd_impl<float, float>(glp, gent, hidden, weight, bias, tokens, lse, entropy, temperature, ignore_index,
                               budget, dh, grad_w, grad_b, temps, softcap, batch_invariant);
        break;
      case at::kBFloat16:
        bwd_impl<float, c10::BFloat16>(glp, gent, hidden, weight, bias, tokens, lse, entropy, temperature,
                                       ignore_index, budget, dh, grad_w, grad_b, temps, softcap, batch_invariant);
        break;
      case at::kHalf:
        bwd_impl<float, c10::Half>(glp, gent, hidden, weight, bias, tokens, lse, entropy, temperature, ignore_index,
                                   budget, dh, grad_w, grad_b, temps, softcap, batch_invariant);
        break;
      default:
        TORCH_CHECK(false, "linear_logprobs: unsupported dtype ", hidden.scalar_type());
    }
  }
  at::Tensor gh = need_h ? dh.to(hidden.scalar_type()) : at::empty({0}, hidden.options());
  if (!need_w) grad_w = at::empty({0}, weight.options());
  if (!need_b) grad_b = at::empty({0}, opts);
  return {gh, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("linear_logprobs_fwd", &linear_logprobs_fwd);
  m.impl("linear_logprobs_bwd", &linear_logprobs_bwd);
}
