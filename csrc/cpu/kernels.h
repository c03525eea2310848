// The interface between each op's CPU entry point (csrc/cpu/<op>.cpp: checks, allocation,
// at::parallel_for) and its loops (csrc/cpu/kernels/<op>.cpp), which are compiled once per ISA
// (cpu/isa.h). A kernel works on raw pointers over a range [lo, hi) of rows or elements; each
// kernel file defines a constant table of them, and <op>_kernels() returns the selected ISA's table.
// Kernel files include no ATen header: only this one, common.h and row_index.h.
#pragma once
#include <cstdint>
#include <type_traits>

#include "common.h"
#include "cpu/isa.h"
#include "row_index.h"

namespace rk {
namespace cpu {

// One kernel per accumulation dtype (Fn is a function type template).
template <template <typename> class Fn> struct ByType {
  Fn<float>* f32;
  Fn<double>* f64;
  template <typename T> Fn<T>* of() const {
    if constexpr (std::is_same_v<T, float>) return f32;
    else return f64;
  }
};
template <typename Args> using RangeFn = void(const Args&, int64_t lo, int64_t hi);

// ---- logprobs_from_logits: rows of logits[..., V] ----
enum class Dtype { f32, f64, bf16, f16 };
struct LogitsFwdArgs {
  const void* logits;  // in `dtype`; rows addressed through `rows`
  Dtype dtype;
  RowIndex rows;
  int64_t V;
  const int64_t* tokens;
  void *logp, *ent, *lse;  // accumulation dtype (f64 for f64 logits, else f32); ent null when not asked for
  double inv_t;
  const void* temps;  // per-row temperatures (accumulation dtype), replacing inv_t; null: inv_t for every row
  double softcap;     // z <- c·tanh(z/c) before the temperature; 0: none
  int64_t ignore_index;
};
struct LogitsBwdArgs {
  const void* logits;
  Dtype dtype;
  RowIndex rows;
  int64_t V;
  const int64_t* tokens;
  const void *g_logp, *g_ent;  // null: no gradient through it
  const void *lse, *ent;
  void* grad;  // contiguous [N, V] in the logits dtype
  double inv_t;
  const void* temps;
  double softcap;
  int64_t ignore_index;
};
struct LogitsKernels {
  RangeFn<LogitsFwdArgs>* fwd;
  RangeFn<LogitsBwdArgs>* bwd;
};

// ---- linear_logprobs: the fused passes over one logits tile Z[nr, vc] = h_r · W_cᵀ ----
struct TileArgs {
  int64_t nr, vc, v0, vocab, ignore_index;
  const int64_t* tok;  // this tile's rows
  double softcap;      // z <- c·tanh(z/c) before the temperature; 0: none
};
// The head's per-row settings travel as per-row arrays offset to the tile's rows: inv_t[i] = 1/temperature
// (further per-row settings join them the same way).
// merge each row's state into st[i], pick the target logit into tgt[i]
template <typename T>
using TileFwdFn = void(T* Z, const T* bias, const T* inv_t, const TileArgs& a, LseState<T>* st, T* tgt);
// Z becomes d(logits) in place; db (if not null) += its column sums
template <typename T>
using TileBwdFn = void(T* Z, const T* bias, const T* inv_t, const TileArgs& a, const T* lse, const T* ent,
                       const T* g_lp, const T* g_h, T* db);
struct LinearKernels {
  ByType<TileFwdFn> fwd_tile;
  ByType<TileBwdFn> bwd_tile;
};

// ---- fixed-order GEMM tiles (batch-invariant linear_logprobs): each element's order of operations depends
// only on the reduction length, never on the tile's shape, its position or the alignment (kernels/fixed_gemm.cpp)
// Z[i·ldz + j] = Σ_k A[i·H + k]·B[j·H + k] for i < nr, j < nc
template <typename T> using DotTileFn = void(const T* A, const T* B, T* Z, int64_t nr, int64_t nc, int64_t H, int64_t ldz);
// Out[r·H + k] += Σ_s C[r·cs_r + s·cs_s]·B[s·H + k], s ascending, for r < nr
template <typename T>
using AxpyTileFn = void(const T* C, int64_t cs_r, int64_t cs_s, const T* B, T* Out, int64_t nr, int64_t ns, int64_t H);
struct FixedGemmKernels {
  ByType<DotTileFn> dot;
  ByType<AxpyTileFn> axpy;
};

// ---- token_kl: elementwise ----
template <typename T> struct KlArgs {
  const T *grad, *logp, *ref;  // grad: backward only
  T *out, *g_logp, *g_ref;     // out: forward only
  int64_t estimator;
  T clamp;
};
template <typename T> using KlFn = RangeFn<KlArgs<T>>;
struct TokenKlKernels {
  ByType<KlFn> fwd, bwd;
};

// ---- dpo_loss: elementwise over the pairs ----
template <typename T> struct DpoArgs {
  const T *grad, *c, *r, *cr, *rr;  // grad: backward only
  T *losses, *c_rew, *r_rew;        // forward outputs
  T *gc, *gr, *gcr, *grr;           // backward outputs
  T beta, eps;
  int64_t type;
};
template <typename T> using DpoFn = RangeFn<DpoArgs<T>>;
struct DpoKernels {
  ByType<DpoFn> fwd, bwd;
};

// ---- the row ops over contiguous [R, n] ----
template <typename T> struct GaeArgs {
  const T *r, *v;
  const uint8_t *mask, *dones;  // dones null: none
  T *adv, *ret;
  int64_t n;
  T gamma, lam;
};
template <typename T> using GaeFn = RangeFn<GaeArgs<T>>;
struct GaeKernels {
  ByType<GaeFn> rows;
};

template <typename T> struct RewardArgs {
  const T *score, *logp, *ref, *dense;  // logp/ref null without a KL term, dense null without dense rewards
  const uint8_t* mask;
  T* out;
  int64_t n, estimator;
  T kl_coef, dense_coef, dense_clip;
  bool after_eos;
};
template <typename T> using RewardFn = RangeFn<RewardArgs<T>>;
struct TokenRewardsKernels {
  ByType<RewardFn> rows;
};

// masked_whiten over a flat array: moments of one chunk, then the elementwise pass over [lo, hi)
template <typename T> using MomentsFn = Moments<T>(const T* x, const uint8_t* m, int64_t n);
template <typename T> struct WhitenArgs {
  const T* x;
  const uint8_t* mask;
  T* out;
  T mean, inv_std;
  bool shift_mean;
};
template <typename T> using NormalizeFn = RangeFn<WhitenArgs<T>>;
struct WhitenKernels {
  ByType<MomentsFn> moments;
  ByType<NormalizeFn> normalize;
};

// ---- the PPO losses: per-row partial sums forward, per-token gradients backward ----
template <typename T> struct RowPartial {
  T sum = 0, kl = 0;  // kl: Σ ½(logp − old)² (policy loss only)
  int64_t n = 0, clipped = 0;
  T ratio_sum = 0, ratio_max = 0, token_kl = 0, weight_sum = 0;  // policy loss only: its stats
};
template <typename T> struct PolicyArgs {
  const T *logp, *old, *adv;  // adv: [R, T], or [R] when adv_per_row
  const uint8_t* mask;
  int64_t n;
  T clip_low, clip_high, dual_clip;
  RowPartial<T>* part;  // forward output, one per row
  T grad;               // backward: ∂L/∂loss
  const T* row_weight;
  T *g_logp, *g_adv;  // g_adv null unless asked for
  // the GRPO-family arguments; all off/null is plain PPO, which takes the original loops
  const T *weights, *ref;  // null when not given
  bool adv_per_row, seq_ratio, cispo;
  int64_t kl_estimator;
  T kl_coef;
  T* g_old;  // null unless asked for (plain PPO's is −g_logp, formed by the caller)
  bool extended() const { return weights || ref || adv_per_row || seq_ratio || cispo; }
};
template <typename T> using PolicyFn = RangeFn<PolicyArgs<T>>;
struct PolicyLossKernels {
  ByType<PolicyFn> fwd, bwd;
};

template <typename T> struct ValueArgs {
  const T *values, *old, *ret;
  const uint8_t* mask;
  int64_t n;
  T clip;
  RowPartial<T>* part;
  T grad;
  const T* row_weight;
  T *g_values, *g_old, *g_ret;  // g_old and g_ret null unless asked for
};
template <typename T> using ValueFn = RangeFn<ValueArgs<T>>;
struct ValueLossKernels {
  ByType<ValueFn> fwd, bwd;
};

// ---- group_advantages: groups of scores[B], each read in member order (sum, squared deviations, output) ----
template <typename T> struct GroupArgs {
  const T* scores;
  const int64_t *order, *offsets;  // labelled groups: order[offsets[k]:offsets[k + 1]]; null: blocks of group_size
  T* out;
  int64_t B, group_size, baseline, scale;
  T eps;
};
// Malformed order/offsets (only possible in labelled groups) stop the range: the entry point raises.
enum class GroupStatus { ok, bad_offsets, bad_order };
template <typename T> using GroupFn = GroupStatus(const GroupArgs<T>&, int64_t lo, int64_t hi);
struct GroupAdvantagesKernels {
  ByType<GroupFn> groups;
};

// ---- rollout_correction: rows of [R, n]; each row's stats partials, combined in row order by the entry ----
template <typename T> struct RcRowStats {
  T k1 = 0, k3 = 0, w = 0;
  int64_t n = 0, kept = 0;
};
template <typename T> struct RcArgs {
  const T *old, *rollout;
  const uint8_t* mask;
  T* weights;
  uint8_t* mask_out;
  RcRowStats<T>* part;  // one per row
  int64_t n, level, mode;
  T low, high;
};
template <typename T> using RcFn = RangeFn<RcArgs<T>>;
struct RolloutCorrectionKernels {
  ByType<RcFn> rows;
};

// ---- the tables: one per op in each compiled ISA, and the accessor of the selected one ----
// A copy this build lacks (setup.py RLHF_KERNELS_CPU_ISAS) is neither declared nor offered: a null table.
#if defined(RK_CPU_WITH_AVX2)
#define RK_CPU_DECLARE_AVX2(Type, name) namespace avx2 { extern const Type name; }
#define RK_CPU_TABLE_AVX2(name) &avx2::name
#else
#define RK_CPU_DECLARE_AVX2(Type, name)
#define RK_CPU_TABLE_AVX2(name) nullptr
#endif
#if defined(RK_CPU_WITH_AVX512)
#define RK_CPU_DECLARE_AVX512(Type, name) namespace avx512 { extern const Type name; }
#define RK_CPU_TABLE_AVX512(name) &avx512::name
#else
#define RK_CPU_DECLARE_AVX512(Type, name)
#define RK_CPU_TABLE_AVX512(name) nullptr
#endif
#define RK_CPU_TABLE(Type, name)                   \
  namespace baseline { extern const Type name; } \
  RK_CPU_DECLARE_AVX2(Type, name)                \
  RK_CPU_DECLARE_AVX512(Type, name)              \
  inline const Type& name##_kernels() {          \
    return pick<Type>(&baseline::name, RK_CPU_TABLE_AVX2(name), RK_CPU_TABLE_AVX512(name)); \
  }

RK_CPU_TABLE(LogitsKernels, logprobs_from_logits)
RK_CPU_TABLE(LinearKernels, linear_logprobs)
RK_CPU_TABLE(FixedGemmKernels, fixed_gemm)
RK_CPU_TABLE(TokenKlKernels, token_kl)
RK_CPU_TABLE(DpoKernels, dpo_loss)
RK_CPU_TABLE(GaeKernels, gae)
RK_CPU_TABLE(TokenRewardsKernels, token_rewards)
RK_CPU_TABLE(WhitenKernels, masked_whiten)
RK_CPU_TABLE(PolicyLossKernels, ppo_policy_loss)
RK_CPU_TABLE(ValueLossKernels, ppo_value_loss)
RK_CPU_TABLE(GroupAdvantagesKernels, group_advantages)
RK_CPU_TABLE(RolloutCorrectionKernels, rollout_correction)
#undef RK_CPU_TABLE
#undef RK_CPU_DECLARE_AVX2
#undef RK_CPU_TABLE_AVX2
#undef RK_CPU_DECLARE_AVX512
#undef RK_CPU_TABLE_AVX512

}  // namespace cpu
}  // namespace rk
