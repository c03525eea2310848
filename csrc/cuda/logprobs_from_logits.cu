// CUDA kernels of rlhf_kernels::logprobs_from_logits_{fwd,bwd}.
// Forward: one block per row; each thread folds its strided share of the row into an rk::LseState (one read
// of the logits, in their own dtype), then the block merges the states with rk::lse_merge along a fixed
// tree (warp shuffles, then one warp over the per-warp results): deterministic, no atomics.
// Backward: one block per row, one pass writing the gradient with rk::logprob_entropy_grad.
// Rows are read (and the gradient written) in 16-byte vectors: a row's unaligned head and its tail go
// one element at a time, the aligned body 16 bytes per thread and access (8 bf16/fp16, 4 fp32, 2 fp64).
// batch_invariant: where the aligned body starts depends on the row's address, i.e. on its position in
// the batch when V is not a multiple of the vector width, and it decides which thread folds which
// element; the forward then reads element by element (thread t takes j ≡ t mod kRowThreads), an order
// that depends on V alone. The backward is elementwise: batch-invariant either way.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "checks.h"
#include "common.h"
#include "cuda/launch.cuh"
#include "replay.h"
#include "row_index.h"

namespace {

constexpr int kRowThreads = 256;
constexpr int kWarps = kRowThreads / 32;
constexpr int64_t kMaxGrid = 1 << 20;  // rows beyond this are taken by a grid-stride loop

template <typename T> __device__ __forceinline__ rk::LseState<T> shfl_down(const rk::LseState<T>& st, int d) {
  return {__shfl_down_sync(0xffffffffu, st.m, d), __shfl_down_sync(0xffffffffu, st.s, d),
          __shfl_down_sync(0xffffffffu, st.w, d)};
}

// Merge the block's states; the result is valid in thread 0. Fixed order, so bitwise reproducible.
template <typename T> __device__ rk::LseState<T> block_merge(rk::LseState<T> st) {
  __shared__ T sm[kWarps], ss[kWarps], sw[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int d = 16; d >= 1; d /= 2) st = rk::lse_merge(st, shfl_down(st, d));
  if (lane == 0) {
    sm[warp] = st.m;
    ss[warp] = st.s;
    sw[warp] = st.w;
  }
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? rk::LseState<T>{sm[lane], ss[lane], sw[lane]} : rk::lse_init<T>();
    for (int d = 16; d >= 1; d /= 2) st = rk::lse_merge(st, shfl_down(st, d));
  }
  __syncthreads();  // the shared slots are reused by the next row of a grid-stride loop
  return st;
}

// ---- 16-byte vector access to a row (any element alignment) ----
template <typename in_t> constexpr int kVec = 16 / static_cast<int>(sizeof(in_t));
struct alignas(16) Vec16 {
  unsigned char b[16];
};
// Elements before the first 16-byte boundary of p (tensor data is always aligned to its element size).
template <typename in_t> __device__ __forceinline__ int64_t head_len(const in_t* p) {
  const auto mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 16);
  return mis == 0 ? 0 : (16 - mis) / static_cast<int64_t>(sizeof(in_t));
}
template <typename in_t> __device__ __forceinline__ void unpack(const Vec16& v, in_t* e) { memcpy(e, v.b, 16); }
__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// f(j, row[j]) for the block thread's share of j in [0, V), in a fixed order per thread.
template <typename in_t, typename F> __device__ __forceinline__ void for_each_in_row(const in_t* row, int64_t V, F f) {
  constexpr int W = kVec<in_t>;
  const int64_t head = min64(V, head_len(row));
  for (int64_t j = threadIdx.x; j < head; j += kRowThreads) f(j, row[j]);
  const int64_t nvec = (V - head) / W;
  const Vec16* body = reinterpret_cast<const Vec16*>(row + head);
  for (int64_t k = threadIdx.x; k < nvec; k += kRowThreads) {
    in_t e[W];
    unpack(body[k], e);
#pragma unroll
    for (int q = 0; q < W; ++q) f(head + k * W + q, e[q]);
  }
  for (int64_t j = head + nvec * W + threadIdx.x; j < V; j += kRowThreads) f(j, row[j]);
}

// out[j] = f(j, in[j]) for the thread's share; `in` null means f(j, 0). Vector loads of `in`, and
// vector stores too when out has the same offset from a 16-byte boundary (else element stores).
template <typename in_t, typename F>
__device__ __forceinline__ void map_row(const in_t* in, in_t* out, int64_t V, F f) {
  constexpr int W = kVec<in_t>;
  const in_t* lead = in ? in : out;  // the pointer whose alignment sets the split
  const int64_t head = min64(V, head_len(lead));
  const bool vec_out = head_len(out) == head_len(lead);
  for (int64_t j = threadIdx.x; j < head; j += kRowThreads) out[j] = f(j, in ? in[j] : in_t(0));
  const int64_t nvec = (V - head) / W;
  for (int64_t k = threadIdx.x; k < nvec; k += kRowThreads) {
    const int64_t j0 = head + k * W;
    in_t e[W];
    if (in) unpack(reinterpret_cast<const Vec16*>(in + head)[k], e);
#pragma unroll
    for (int q = 0; q < W; ++q) e[q] = f(j0 + q, in ? e[q] : in_t(0));
    if (vec_out) {
      Vec16 v;
      memcpy(v.b, e, 16);
      reinterpret_cast<Vec16*>(out + head)[k] = v;
    } else {
#pragma unroll
      for (int q = 0; q < W; ++q) out[j0 + q] = e[q];
    }
  }
  for (int64_t j = head + nvec * W + threadIdx.x; j < V; j += kRowThreads) out[j] = f(j, in ? in[j] : in_t(0));
}

// The head's options per row: 1/temperature (per-row temperatures when given), and the softcap
// cap(x) = c·tanh(x/c) (c = 0: none) with its derivative 1 − (cap/c)².
template <typename T> __device__ __forceinline__ T row_inv_t(const T* temps, int64_t r, T inv_t) {
  return temps ? T(1) / temps[r] : inv_t;
}
template <typename T> __device__ __forceinline__ T capped(T x, T c) { return c > T(0) ? c * tanh(x / c) : x; }
template <typename T> __device__ __forceinline__ T cap_slope(T y, T c) {
  if (c <= T(0)) return T(1);
  const T u = y / c;
  return T(1) - u * u;
}

template <typename in_t, typename T>
__global__ void __launch_bounds__(kRowThreads)
    logprobs_fwd_kernel(const in_t* __restrict__ x, rk::RowIndex rows, int64_t N, int64_t V,
                        const int64_t* __restrict__ tokens, T* __restrict__ logp, T* __restrict__ ent,
                        T* __restrict__ lse, T inv_t0, const T* __restrict__ temps, T softcap, int64_t ignore_index,
                        bool invariant, const T* __restrict__ thr) {
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const T inv_t = row_inv_t(temps, r, inv_t0);
    const int64_t tok = tokens[r];
    if (tok == ignore_index) {  // uniform across the block: no thread reaches block_merge
      if (threadIdx.x == 0) {
        logp[r] = lse[r] = T(0);
        if (ent) ent[r] = T(0);
      }
      continue;
    }
    const in_t* row = x + rows.offset(r);
    // the sampler replay: z below the row's threshold is out of the kept set (−inf)
    const T th = thr ? thr[r] : -rk::r_inf<T>();
    rk::LseState<T> st = rk::lse_init<T>();
    auto push = [&](int64_t, in_t x) {
      const T z = capped(static_cast<T>(x), softcap) * inv_t;
      rk::lse_push(st, z >= th ? z : -rk::r_inf<T>());
    };
    if (invariant) {
      for (int64_t j = threadIdx.x; j < V; j += kRowThreads) push(j, row[j]);
    } else {
      for_each_in_row(row, V, push);
    }
    st = block_merge(st);
    if (threadIdx.x == 0) {
      const T l = rk::lse_value(st);
      lse[r] = l;
      // out-of-range ids (validate=False) read nothing and give NaN
      const T zt = (tok >= 0 && tok < V) ? capped(static_cast<T>(row[tok]), softcap) * inv_t : T(0);
      logp[r] = (tok >= 0 && tok < V) ? (zt >= th ? zt - l : -rk::r_inf<T>()) : rk::r_nan<T>();
      if (ent) ent[r] = rk::lse_entropy(st);
    }
  }
}

template <typename in_t, typename T>
__global__ void __launch_bounds__(kRowThreads)
    logprobs_bwd_kernel(const in_t* __restrict__ x, rk::RowIndex rows, int64_t N, int64_t V,
                        const int64_t* __restrict__ tokens, const T* __restrict__ g_logp,
                        const T* __restrict__ g_ent, const T* __restrict__ lse, const T* __restrict__ ent,
                        in_t* __restrict__ grad, T inv_t0, const T* __restrict__ temps, T softcap,
                        int64_t ignore_index, const T* __restrict__ thr) {
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const T inv_t = row_inv_t(temps, r, inv_t0);
    const int64_t tok = tokens[r];
    in_t* g = grad + r * V;
    if (tok == ignore_index) {
      map_row<in_t>(nullptr, g, V, [](int64_t, in_t) { return static_cast<in_t>(T(0)); });
      continue;
    }
    const in_t* row = x + rows.offset(r);
    const bool in_range = tok >= 0 && tok < V;
    // an out-of-range id has logp = NaN (a constant): no gradient flows through it, as in the reference
    // ... and neither does a token outside its kept set (logp = −inf, a constant)
    const T th = thr ? thr[r] : -rk::r_inf<T>();
    const bool tok_kept = !in_range || capped(static_cast<T>(row[tok]), softcap) * inv_t >= th;
    const T g_lp = (g_logp && in_range && tok_kept) ? g_logp[r] : T(0);
    const T g_H = g_ent ? g_ent[r] : T(0);
    const T H = g_ent ? ent[r] : T(0);
    const T l = lse[r];
    map_row(row, g, V, [&](int64_t j, in_t x) {
      const T y = capped(static_cast<T>(x), softcap);
      if (!(y * inv_t >= th)) return static_cast<in_t>(T(0));
      return static_cast<in_t>(rk::logprob_entropy_grad(y * inv_t, l, H, j == tok, g_lp, g_H) * inv_t *
                               cap_slope(y, softcap));
    });
  }
}

// The sampler replay's threshold of each row (csrc/replay.h), one thread per row: each bisection step reads the
// row from memory. Simple rather than fast (a block-per-row version would split every pass across the block).
template <typename in_t, typename T>
__global__ void replay_threshold_kernel(const in_t* __restrict__ x, rk::RowIndex rows, int64_t N, int64_t V,
                                        const int64_t* __restrict__ tokens, T inv_t0, const T* __restrict__ temps,
                                        T softcap, int64_t ignore_index, const int64_t* __restrict__ top_k,
                                        const T* __restrict__ top_p, T* __restrict__ thr) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= N) return;
  const int64_t k = top_k ? top_k[r] : 0;
  const T p = top_p ? top_p[r] : T(1);
  if (tokens[r] == ignore_index || ((k <= 0 || k >= V) && !(p < T(1)))) {
    thr[r] = -rk::r_inf<T>();
    return;
  }
  const T inv_t = row_inv_t(temps, r, inv_t0);
  const in_t* row = x + rows.offset(r);
  auto z = [&](int64_t j) { return capped(static_cast<T>(row[j]), softcap) * inv_t; };
  auto e = [&](int64_t j, T m) {
    const T v = z(j);
    return v == -rk::r_inf<T>() ? T(0) : rk::r_exp(v - m);
  };
  thr[r] = rk::replay_threshold<T>(z, e, V, k, p);
}

unsigned grid_for(int64_t N) { return static_cast<unsigned>(N < kMaxGrid ? N : kMaxGrid); }

// in_t: the logits dtype; T: the accumulation dtype (double for fp64 logits, float otherwise)
template <typename F> void dispatch_logits(at::ScalarType st, F f) {
  switch (st) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kDouble: f(double{}, double{}); break;
    case at::kBFloat16: f(c10::BFloat16{}, float{}); break;
    case at::kHalf: f(c10::Half{}, float{}); break;
    default: TORCH_CHECK(false, "logprobs_from_logits: unsupported logits dtype ", st);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_from_logits_fwd(const at::Tensor& logits_in,
                                                                        const at::Tensor& tokens, double temperature,
                                                                        int64_t ignore_index, bool return_entropy,
                                                                        const std::optional<at::Tensor>& temps,
                                                                        double softcap, bool batch_invariant,
                                                                        const std::optional<at::Tensor>& thresholds) {
  rk::check_logprobs_from_logits(logits_in, tokens);
  rk::check_head_options("logprobs_from_logits", temps, softcap, rk::accumulation_type(logits_in), tokens.numel(),
                         logits_in);
  const bool has_t = temps && temps->defined();
  const bool has_thr = thresholds && thresholds->defined();
  if (has_thr)
    rk::check_per_row("logprobs_from_logits_fwd", "thresholds", *thresholds, rk::accumulation_type(logits_in),
                      tokens.numel(), logits_in);
  c10::cuda::CUDAGuard guard(logits_in.device());
  rk::RowIndex rows;
  const at::Tensor logits = rk::readable_rows(logits_in, rows);
  const bool f64 = logits.scalar_type() == at::kDouble;
  auto opts = logits.options().dtype(f64 ? at::kDouble : at::kFloat);
  at::Tensor logp = at::empty(tokens.sizes(), opts), lse = at::empty(tokens.sizes(), opts);
  at::Tensor ent = return_entropy ? at::empty(tokens.sizes(), opts) : at::empty({0}, opts);
  const int64_t N = tokens.numel(), V = logits.size(-1);
  if (N == 0) return {logp, ent, lse};
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_logits(logits.scalar_type(), [&](auto in_tag, auto acc_tag) {
    using in_t = decltype(in_tag);
    using T = decltype(acc_tag);
    logprobs_fwd_kernel<in_t, T><<<grid_for(N), kRowThreads, 0, stream>>>(
        static_cast<const in_t*>(logits.const_data_ptr()), rows, N, V, tokens.const_data_ptr<int64_t>(),
        logp.mutable_data_ptr<T>(), return_entropy ? ent.mutable_data_ptr<T>() : nullptr, lse.mutable_data_ptr<T>(),
        static_cast<T>(1.0 / temperature), has_t ? temps->const_data_ptr<T>() : nullptr, static_cast<T>(softcap),
        ignore_index, batch_invariant, has_thr ? thresholds->const_data_ptr<T>() : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logp, ent, lse};
}

at::Tensor logprobs_from_logits_bwd(const std::optional<at::Tensor>& grad_logp,
                                    const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits_in,
                                    const at::Tensor& tokens, const at::Tensor& lse, const at::Tensor& entropy,
                                    double temperature, int64_t ignore_index, const std::optional<at::Tensor>& temps,
                                    double softcap, bool /*batch_invariant*/,
                                    const std::optional<at::Tensor>& thresholds) {
  rk::check_logprobs_from_logits_bwd(grad_logp, grad_entropy, logits_in, tokens, lse, entropy);
  const bool has_thr = thresholds && thresholds->defined();
  if (has_thr)
    rk::check_per_row("logprobs_from_logits_bwd", "thresholds", *thresholds, lse.scalar_type(), tokens.numel(),
                      logits_in);
  rk::check_head_options("logprobs_from_logits_bwd", temps, softcap, rk::accumulation_type(logits_in),
                         tokens.numel(), logits_in);
  const bool has_t = temps && temps->defined();
  c10::cuda::CUDAGuard guard(logits_in.device());
  rk::RowIndex rows;
  const at::Tensor logits = rk::readable_rows(logits_in, rows);
  const int64_t N = tokens.numel(), V = logits.size(-1);
  const bool has_glp = grad_logp.has_value() && grad_logp->defined();
  const bool has_gH = grad_entropy.has_value() && grad_entropy->defined();
  at::Tensor grad = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return grad;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_logits(logits.scalar_type(), [&](auto in_tag, auto acc_tag) {
    using in_t = decltype(in_tag);
    using T = decltype(acc_tag);
    logprobs_bwd_kernel<in_t, T><<<grid_for(N), kRowThreads, 0, stream>>>(
        static_cast<const in_t*>(logits.const_data_ptr()), rows, N, V, tokens.const_data_ptr<int64_t>(),
        has_glp ? grad_logp->const_data_ptr<T>() : nullptr, has_gH ? grad_entropy->const_data_ptr<T>() : nullptr,
        lse.const_data_ptr<T>(), has_gH ? entropy.const_data_ptr<T>() : nullptr,
        static_cast<in_t*>(grad.mutable_data_ptr()), static_cast<T>(1.0 / temperature),
        has_t ? temps->const_data_ptr<T>() : nullptr, static_cast<T>(softcap), ignore_index,
        has_thr ? thresholds->const_data_ptr<T>() : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

at::Tensor logprobs_from_logits_threshold(const at::Tensor& logits_in, const at::Tensor& tokens, double temperature,
                                          int64_t ignore_index, const std::optional<at::Tensor>& temps,
                                          double softcap, const std::optional<at::Tensor>& top_k,
                                          const std::optional<at::Tensor>& top_p) {
  rk::check_replay_threshold(logits_in, tokens, temps, softcap, top_k, top_p);
  const auto acc = rk::accumulation_type(logits_in);
  const bool has_t = temps && temps->defined(), has_k = top_k && top_k->defined(), has_p = top_p && top_p->defined();
  c10::cuda::CUDAGuard guard(logits_in.device());
  rk::RowIndex rows;
  const at::Tensor logits = rk::readable_rows(logits_in, rows);
  at::Tensor thr = at::empty(tokens.sizes(), logits.options().dtype(acc));
  const int64_t N = tokens.numel(), V = logits.size(-1);
  if (N == 0) return thr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 128;
  dispatch_logits(logits.scalar_type(), [&](auto in_tag, auto acc_tag) {
    using in_t = decltype(in_tag);
    using T = decltype(acc_tag);
    replay_threshold_kernel<in_t, T><<<static_cast<unsigned>((N + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        static_cast<const in_t*>(logits.const_data_ptr()), rows, N, V, tokens.const_data_ptr<int64_t>(),
        static_cast<T>(1.0 / temperature), has_t ? temps->const_data_ptr<T>() : nullptr, static_cast<T>(softcap),
        ignore_index, has_k ? top_k->const_data_ptr<int64_t>() : nullptr,
        has_p ? top_p->const_data_ptr<T>() : nullptr, thr.mutable_data_ptr<T>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return thr;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("logprobs_from_logits_fwd", &logprobs_from_logits_fwd);
  m.impl("logprobs_from_logits_bwd", &logprobs_from_logits_bwd);
  m.impl("logprobs_from_logits_threshold", &logprobs_from_logits_threshold);
}
