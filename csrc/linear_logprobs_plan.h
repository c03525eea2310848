// Chunk plans of linear_logprobs for the cpu and cuda backends: how many rows (nc) and vocabulary
// entries (vc) a logits chunk holds and, on CPU, how many vocabulary groups run in parallel, sized so
// that every temporary that scales with the chunking (logits chunk, d(logits) and its low-precision
// copy, cast weight/hidden tiles, d(W)/d(hidden) GEMM partials, bias sums, further groups' state)
// fits the budget B (RLHF_KERNELS_CHUNK_BYTES). `bytes` is the pass's exact extra memory (allocations
// beyond its inputs and outputs), the formula the docstring of rlhf_kernels/ops/linear_logprobs.py
// states. Host-only arithmetic, shared by both backends and exposed to the tests as
// rlhf_kernels::_linear_logprobs_plan.
//
// The per-row terms (`fixed`) are not chunked and come on top of B: the first group's online
// log-sum-exp state and target logits (forward, 16 or 32 bytes a row) and, for bf16/fp16 inputs, the
// fp32 accumulator of d(hidden) [N, H] (backward; rounding partial sums to bf16 would lose the
// gradient's precision). Counting them against B would collapse the chunks exactly where they matter
// (at N = 16k, H = 4096 the accumulator alone is 256 MiB). Both passes also hold one inverse temperature
// per row (N·acc, the head's per-row settings).
#pragma once
#include <algorithm>
#include <cstdint>

namespace rk {

struct LinearPlanArgs {
  int64_t N, V, H;
  int64_t acc;      // bytes of the accumulation dtype (4, or 8 for fp64)
  int64_t store;    // bytes of hidden/weight as stored (2 for bf16/fp16, else = acc)
  bool backward;    // plan the backward pass (else the forward)
  bool need_h, need_w, need_b;
  int64_t budget;   // B
  int64_t threads;  // CPU: parallel workers available
};

struct LinearPlan {
  int64_t nc = 1, vc = 1;  // rows and vocabulary entries of a logits chunk
  int64_t fixed = 0;       // the per-row terms of `bytes`, outside the budget
  int64_t chunks = 1;      // vocabulary chunks
  int64_t groups = 1;      // CPU: groups of consecutive chunks run in parallel
  int64_t bytes = 0;       // extra memory of the pass with this plan
  int64_t first(int64_t g) const { return g * chunks / groups; }
};

// Halve the larger side of the chunk until `cost(nc, vc)` fits `avail` (or the chunk is 1 × 1).
template <typename F> void shrink_to_fit(int64_t& nc, int64_t& vc, int64_t avail, F cost) {
  while (cost(nc, vc) > avail && (nc > 1 || vc > 1)) {
    if (vc >= nc) vc = std::max<int64_t>(1, vc / 2);
    else nc = std::max<int64_t>(1, nc / 2);
  }
}

// CPU (csrc/cpu/linear_logprobs.cpp). Per group: the logits tile nc·vc·acc and, for bf16/fp16 inputs
// (cast to fp32 tile by tile), the cast weight chunk vc·H·acc, the cast hidden tile nc·H·acc and, in
// backward with a weight gradient, the fp32 d(W) chunk vc·H·acc. Groups after the first also hold
// their own per-row state: 3·N·acc (forward) or a d(hidden) partial N·H·acc (backward). Fixed: the
// first group's state and the target logits 4·N·acc (forward), 1/τ per row N·acc (both passes); the
// fp32 d(hidden) accumulator N·H·acc for bf16/fp16 inputs (backward; for fp32/fp64 it is the output itself).
inline LinearPlan linear_plan_cpu(const LinearPlanArgs& a) {
  const bool low = a.store != a.acc;
  const int64_t fixed = (a.backward ? (low && a.need_h ? a.N * a.H * a.acc : 0) : 4 * a.N * a.acc) + a.N * a.acc;
  const int64_t per_extra_group = a.backward ? (a.need_h ? a.N * a.H * a.acc : 0) : 3 * a.N * a.acc;
  auto tile = [&](int64_t nc, int64_t vc) {
    return a.acc * (nc * vc + (low ? (vc + nc) * a.H : 0) + (a.backward && low && a.need_w ? vc * a.H : 0));
  };
  LinearPlan p;
  const int64_t avail = a.budget;
  // preferred: about 1 MiB of logits (stays in L2 between its GEMM and the fused pass), ≤ 512 rows
  p.nc = std::max<int64_t>(1, std::min<int64_t>(a.N, 512));
  const int64_t vc0 = std::max<int64_t>(1, std::min<int64_t>({a.V, std::max<int64_t>(16, (int64_t(1) << 18) / p.nc), 4096}));
  p.vc = vc0;
  shrink_to_fit(p.nc, p.vc, avail, tile);
  // halving overshoots: widen the chunk again as far as the budget allows (the tile is affine in vc)
  const int64_t per_vc = tile(p.nc, 1) - tile(p.nc, 0);
  if (avail > tile(p.nc, 0)) p.vc = std::max(p.vc, std::min(vc0, (avail - tile(p.nc, 0)) / per_vc));
  p.chunks = (a.V + p.vc - 1) / p.vc;
  const int64_t one = tile(p.nc, p.vc);
  const int64_t more = avail >= one ? (avail - one) / (one + per_extra_group) : 0;
  p.groups = 1 + std::max<int64_t>(0, std::min<int64_t>({p.chunks - 1, a.threads - 1, more}));
  p.fixed = fixed;
  p.bytes = fixed + p.groups * one + (p.groups - 1) * per_extra_group;
  return p;
}

// CUDA (csrc/cuda/linear_logprobs.cu), one chunk at a time on the stream. Forward: the logits chunk
// nc·vc·acc; fixed: the state 4·N·acc and 1/τ per row N·acc (in backward too). Backward: the chunk
// nc·vc·acc, its bf16/fp16 copy nc·vc·store,
// for bf16/fp16 the fp32 d(W) chunk vc·H·4 (and its GEMM partial vc·H·4 when there is more than one
// row chunk) and the fp32 d(hidden) GEMM partial nc·H·4, the bias column sums vc·acc (more than one
// row chunk); fixed: the fp32 d(hidden) accumulator N·H·4 for bf16/fp16.
inline LinearPlan linear_plan_cuda(const LinearPlanArgs& a) {
  const bool low = a.store != a.acc;
  const int64_t fixed = (a.backward ? (low && a.need_h ? a.N * a.H * a.acc : 0) : 4 * a.N * a.acc) + a.N * a.acc;
  auto chunk = [&](int64_t nc, int64_t vc) {
    if (!a.backward) return nc * vc * a.acc;
    const bool rows_split = a.N > nc;
    return nc * vc * (a.acc + (low ? a.store : 0)) + (low && a.need_w ? vc * a.H * a.acc * (rows_split ? 2 : 1) : 0) +
           (low && a.need_h ? nc * a.H * a.acc : 0) + (a.need_b && rows_split ? vc * a.acc : 0);
  };
  LinearPlan p;
  const int64_t avail = a.budget;
  // as many rows as possible (up to 4096: fewer, longer GEMMs), then the widest vocabulary chunk that
  // fits, a multiple of 128 (the GEMM tile) where it can be
  p.nc = std::max<int64_t>(1, std::min<int64_t>(a.N, 4096));
  for (;;) {
    const int64_t per_vc = chunk(p.nc, 1) - chunk(p.nc, 0);  // the chunk's cost is affine in vc
    int64_t vc = per_vc > 0 ? (avail - chunk(p.nc, 0)) / per_vc : a.V;
    if (vc >= 128 || p.nc == 1) {
      p.vc = std::max<int64_t>(1, std::min(a.V, vc >= 128 ? vc / 128 * 128 : vc));
      break;
    }
    p.nc = std::max<int64_t>(1, p.nc / 2);  // a small budget: fewer rows before fewer vocabulary entries
  }
  p.chunks = (a.V + p.vc - 1) / p.vc;
  p.fixed = fixed;
  p.bytes = fixed + chunk(p.nc, p.vc);
  return p;
}

}  // namespace rk
