// The op schemas of rlhf_kernels (one namespace, one name per op) and the Python module init.
// Backends register implementations in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu, the losses' autograd
// (every device) in csrc/autograd.cpp.
#include <Python.h>
#include <torch/library.h>

#include <c10/util/Exception.h>

#include "common.h"
#include "cpu/isa.h"

TORCH_LIBRARY(rlhf_kernels, m) {
  // logits[..., V] (vocabulary dim contiguous, leading dims any strides), tokens[...] int64
  // -> logp[...], entropy[...], lse[...] (entropy is empty unless asked for); bwd -> grad_logits[..., V] contiguous.
  // The head's options come last, with defaults: temperatures (per token, tokens' shape, contiguous, the
  // accumulation dtype; replaces `temperature` when given) and softcap (z <- c·tanh(z/c) before the
  // temperature; 0 = none). Further per-row settings are added the same way.
  // thresholds (per row, the accumulation dtype; the sampler replay): logits whose z = cap(x)/t is below
  // their row's threshold are left out (−inf), as is a token's log-prob (−inf, no gradient).
  m.def("logprobs_from_logits_fwd(Tensor logits, Tensor tokens, float temperature, int ignore_index, "
        "bool return_entropy, Tensor? temperatures=None, float softcap=0., bool batch_invariant=False, "
        "Tensor? thresholds=None) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("logprobs_from_logits_bwd(Tensor? grad_logp, Tensor? grad_entropy, Tensor logits, Tensor tokens, "
        "Tensor lse, Tensor entropy, float temperature, int ignore_index, Tensor? temperatures=None, "
        "float softcap=0., bool batch_invariant=False, Tensor? thresholds=None) -> Tensor");
  // The replay's threshold per row from top_k (int64 [N]) and top_p ([N], accumulation dtype), csrc/replay.h.
  m.def("logprobs_from_logits_threshold(Tensor logits, Tensor tokens, float temperature, int ignore_index, "
        "Tensor? temperatures, float softcap, Tensor? top_k, Tensor? top_p) -> Tensor");
  // hidden[N, H] and weight[V, H] of one dtype, bias[V] in the accumulation dtype (fp32, fp64 for fp64
  // inputs), tokens[N] int64 -> logp[N], entropy[N], lse[N] (accumulation dtype). chunk_bytes caps the
  // temporaries (<= 0: the default, 256 MiB). The backward gives grad_hidden, grad_weight, grad_bias,
  // each empty when its need_* flag is false (a frozen weight skips its GEMM).
  // temperatures[N] and softcap as in logprobs_from_logits. batch_invariant: each row's outputs (and its
  // d(hidden) row) do not depend on the other rows (docs/batch_invariant.md).
  m.def("linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor tokens, float temperature, "
        "int ignore_index, int chunk_bytes, Tensor? temperatures=None, float softcap=0., "
        "bool batch_invariant=False) -> (Tensor, Tensor, Tensor)");
  m.def("linear_logprobs_bwd(Tensor grad_logp, Tensor? grad_entropy, Tensor hidden, Tensor weight, Tensor? bias, "
        "Tensor tokens, Tensor lse, Tensor entropy, float temperature, int ignore_index, bool need_hidden, "
        "bool need_weight, bool need_bias, int chunk_bytes, Tensor? temperatures=None, float softcap=0., "
        "bool batch_invariant=False) -> (Tensor, Tensor, Tensor)");
  // c[M, N] = a[M, K] · (trans_b ? b[N, K]ᵀ : b[K, N]), fp32 or fp64, in an order of operations that depends on K
  // and trans_b alone (not on M, N, the split into tasks or blocks, or any address): every element of a row of c
  // is the same bits whatever the other rows of a are. The batch-invariant sampler replay's products.
  m.def("fixed_gemm(Tensor a, Tensor b, bool trans_b) -> Tensor");
  m.def("token_kl_fwd(Tensor logp, Tensor ref_logp, int estimator, float clamp) -> Tensor");
  m.def("token_kl_bwd(Tensor grad, Tensor logp, Tensor ref_logp, int estimator, float clamp) -> (Tensor, Tensor)");
  // score[R], mask[R, T] (uint8); logp/ref_logp/dense[R, T] or empty
  m.def("token_rewards(Tensor score, Tensor mask, Tensor? logp, Tensor? ref_logp, float kl_coef, int kl_estimator, "
        "Tensor? dense, float dense_coef, float dense_clip, bool score_after_eos) -> Tensor");
  // dones[R, T] (bool or uint8, like mask) or None: a done position ends its episode, cutting the recursion
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, Tensor? dones, float gamma, float lam) -> (Tensor, Tensor)");
  // scores[B] -> advantages[B]; groups are consecutive blocks of group_size, or (group_size 0) the runs
  // order[offsets[k]:offsets[k + 1]] (order int64 [B], offsets int64 [B + 1], from a stable sort of the labels)
  m.def("group_advantages(Tensor scores, Tensor? order, Tensor? offsets, int group_size, int baseline, int scale, "
        "float eps) -> Tensor");
  // [R, T] inputs -> weights[R, T], mask_out[R, T] (bool), stats[4] float32 (k1, k3, masked fraction, weight mean)
  m.def("rollout_correction(Tensor old_logp, Tensor rollout_logp, Tensor mask, int level, int mode, float low, "
        "float high) -> (Tensor, Tensor, Tensor)");
  m.def("masked_whiten(Tensor x, Tensor mask, bool shift_mean, bool unbiased, float eps) -> Tensor");
  // [R, T] inputs (advantages [R, T] or [R]; weights, ref_logp [R, T] or None) -> loss[], stats[6] float32
  // (clipfrac, approx_kl, ratio_mean, ratio_max, kl, weight_mean), token weight per row [R] (saved for backward).
  // denominator > 0 replaces the aggregation's divisor; 0 keeps it.
  m.def("ppo_policy_loss_fwd(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, Tensor? weights, "
        "Tensor? ref_logp, float clip_low, float clip_high, float dual_clip, int aggregation, int ratio_level, "
        "int loss_type, float kl_coef, int kl_estimator, float denominator) -> (Tensor, Tensor, Tensor)");
  // -> grad_logp, grad_old_logp, grad_advantages (the last two empty unless asked for)
  m.def("ppo_policy_loss_bwd(Tensor grad_loss, Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, "
        "Tensor? weights, Tensor? ref_logp, Tensor row_weight, float clip_low, float clip_high, float dual_clip, "
        "int ratio_level, int loss_type, float kl_coef, int kl_estimator, bool need_old_grad, bool need_adv_grad) "
        "-> (Tensor, Tensor, Tensor)");
  // -> loss[], vf_clipfrac[], token weight per row [R]
  m.def("ppo_value_loss_fwd(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float clip, "
        "int aggregation) -> (Tensor, Tensor, Tensor)");
  // -> grad_values, grad_old_values, grad_returns (the last two empty unless asked for)
  m.def("ppo_value_loss_bwd(Tensor grad_loss, Tensor values, Tensor old_values, Tensor returns, Tensor mask, "
        "Tensor row_weight, float clip, bool need_data_grads) -> (Tensor, Tensor, Tensor)");
  // -> losses[B], chosen_rewards[B], rejected_rewards[B]; backward gives the gradients of all four inputs
  m.def("dpo_loss_fwd(Tensor chosen_logp, Tensor rejected_logp, Tensor ref_chosen_logp, Tensor ref_rejected_logp, "
        "float beta, int loss_type, float label_smoothing) -> (Tensor, Tensor, Tensor)");
  m.def("dpo_loss_bwd(Tensor grad_losses, Tensor chosen_logp, Tensor rejected_logp, Tensor ref_chosen_logp, "
        "Tensor ref_rejected_logp, float beta, int loss_type, float label_smoothing) -> (Tensor, Tensor, Tensor, Tensor)");
}

#ifndef RLHF_CUDA_ARCHS
#define RLHF_CUDA_ARCHS ""
#endif

namespace {

// _C.cpu_isa() -> "baseline" | "avx2" | "avx512": the ISA of the CPU kernels in this process.
PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(rk::cpu::isa_name(rk::cpu::selected_isa()));
  } catch (const c10::Error& e) {  // a bad RLHF_KERNELS_CPU_ISA
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

// _C.built_cpu_isas: the ISAs whose CPU kernels this build holds (setup.py RLHF_KERNELS_CPU_ISAS), in order.
PyObject* built_cpu_isas() {
  PyObject* out = PyList_New(0);
  for (rk::cpu::Isa isa : {rk::cpu::Isa::baseline, rk::cpu::Isa::avx2, rk::cpu::Isa::avx512}) {
    if (!rk::cpu::built(isa)) continue;
    PyObject* name = PyUnicode_FromString(rk::cpu::isa_name(isa));
    PyList_Append(out, name);
    Py_DECREF(name);
  }
  PyObject* t = PyList_AsTuple(out);
  Py_DECREF(out);
  return t;
}

// The C++ enums the ops take as ints, {enum: {enumerator: value}}, so that a test can hold the
// Python codes (rlhf_kernels/ops/_common.py) to them.
PyObject* codes() {
  struct Code {
    const char *group, *name;
    int64_t value;
  };
  static const Code all[] = {
      {"KlEstimator", "KL_K1", rk::KL_K1},
      {"KlEstimator", "KL_K2", rk::KL_K2},
      {"KlEstimator", "KL_K3", rk::KL_K3},
      {"Aggregation", "AGG_TOKEN_MEAN", rk::AGG_TOKEN_MEAN},
      {"Aggregation", "AGG_SEQ_MEAN_TOKEN_MEAN", rk::AGG_SEQ_MEAN_TOKEN_MEAN},
      {"Aggregation", "AGG_SEQ_MEAN_TOKEN_SUM", rk::AGG_SEQ_MEAN_TOKEN_SUM},
      {"Aggregation", "AGG_TOKEN_SUM", rk::AGG_TOKEN_SUM},
      {"DpoLoss", "DPO_SIGMOID", rk::DPO_SIGMOID},
      {"DpoLoss", "DPO_IPO", rk::DPO_IPO},
      {"DpoLoss", "DPO_HINGE", rk::DPO_HINGE},
      {"DpoLoss", "DPO_ROBUST", rk::DPO_ROBUST},
  };
  PyObject* out = PyDict_New();
  for (const Code& c : all) {
    PyObject* group = PyDict_GetItemString(out, c.group);  // borrowed
    if (group == nullptr) {
      group = PyDict_New();
      PyDict_SetItemString(out, c.group, group);
      Py_DECREF(group);
    }
    PyObject* v = PyLong_FromLongLong(c.value);
    PyDict_SetItemString(group, c.name, v);
    Py_DECREF(v);
  }
  return out;
}

PyMethodDef rk_methods[] = {{"cpu_isa", cpu_isa, METH_NOARGS, "The ISA the CPU kernels run with."},
                            {nullptr, nullptr, 0, nullptr}};

}  // namespace

static struct PyModuleDef rk_module = {PyModuleDef_HEAD_INIT, "_C",
                                       "rlhf_kernels native kernels (ops live in torch.ops.rlhf_kernels)", -1,
                                       rk_methods};

PyMODINIT_FUNC PyInit__C(void) {
  // choose the CPU kernels' ISA now, so that a bad RLHF_KERNELS_CPU_ISA fails the import, not a later op
  PyObject* isa = cpu_isa(nullptr, nullptr);
  if (isa == nullptr) return nullptr;
  Py_DECREF(isa);
  PyObject* m = PyModule_Create(&rk_module);
  if (m == nullptr) return nullptr;
  PyModule_AddObject(m, "codes", codes());
  PyModule_AddObject(m, "built_cpu_isas", built_cpu_isas());
#ifdef RLHF_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(m, "cuda_archs", RLHF_CUDA_ARCHS);
#ifdef _OPENMP
  PyModule_AddIntConstant(m, "with_openmp", 1);
#else
  PyModule_AddIntConstant(m, "with_openmp", 0);
#endif
  return m;
}
