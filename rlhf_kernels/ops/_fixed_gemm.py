"""fixed_gemm: the matrix product in an order of operations that depends on K alone (not on the other rows, the
row count, the split into tasks or any address), per backend: cpu (csrc/cpu/fixed_gemm.cpp), cuda
(csrc/cuda/fixed_gemm.cu), triton (rlhf_kernels/triton/fixed_gemm.py). An internal building block of the
batch-invariant sampler replay (_replay_head.py), not a public op: a [M, K], b [N, K] (trans_b) or [K, N],
contiguous, one float dtype (fp32 or fp64) -> c [M, N]."""
import torch

from ._common import HAVE_C, HAVE_TRITON


def _fake(a, b, trans_b):
    return a.new_empty((a.shape[0], b.shape[0] if trans_b else b.shape[1]))


if HAVE_C:
    torch.library.register_fake("rlhf_kernels::fixed_gemm")(_fake)

if HAVE_TRITON:
    from ..triton import fixed_gemm as _tl

    @torch.library.triton_op("rlhf_kernels::fixed_gemm_triton", mutates_args=())
    def _fixed_gemm_triton(a: torch.Tensor, b: torch.Tensor, trans_b: bool) -> torch.Tensor:
        return _tl.fixed_gemm(a, b, trans_b)

    _fixed_gemm_triton.register_fake(_fake)


def fixed_gemm(a, b, trans_b, backend):
    """a · bᵀ (trans_b) or a · b on `backend` ("cpu", "cuda" or "triton")."""
    op = torch.ops.rlhf_kernels.fixed_gemm_triton if backend == "triton" else torch.ops.rlhf_kernels.fixed_gemm
    return op(a.contiguous(), b.contiguous(), trans_b)
