"""rlhf_kernels::fixed_gemm (the batch-invariant replay's products) on every backend: the float64 product on ragged
shapes in both layouts, each row of c the same bits whatever the other rows of a (and however many), and the
argument checks of the native op."""
import pytest
import torch

from rlhf_kernels.ops._common import HAVE_C
from rlhf_kernels.ops._fixed_gemm import fixed_gemm

from conftest import cpu_backends, needs_gpu

BACKENDS = cpu_backends("linear_logprobs") + [pytest.param("cuda", marks=needs_gpu)]
# (M, K, N): one row, K = 0, one column, K not a multiple of any vector width or tile, several tiles of rows
SHAPES = [(1, 7, 5), (3, 0, 4), (17, 300, 1), (70, 33, 130), (130, 97, 600)]


def _device(backend):
    return "cuda" if backend == "cuda" else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_gemm_matches_float64(backend, dtype):
    g = torch.Generator().manual_seed(0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for M, K, N in SHAPES:
        if backend == "triton" and M * N > 10_000:
            continue  # interpreter time
        a = torch.randn(M, K, generator=g, dtype=dtype)
        bt = torch.randn(N, K, generator=g, dtype=dtype)
        expected = a.double() @ bt.double().T
        a, bt = a.to(_device(backend)), bt.to(_device(backend))
        for trans_b, b in ((True, bt), (False, bt.T.contiguous())):
            c = fixed_gemm(a, b, trans_b, backend)
            assert c.dtype == dtype and c.shape == (M, N)
            torch.testing.assert_close(c.double().cpu(), expected, **tol)


@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_gemm_rows_do_not_depend_on_the_other_rows(backend, trans_b):
    g = torch.Generator().manual_seed(1)
    M, K, N = (40, 70, 90) if backend == "triton" else (300, 1030, 700)
    dev = _device(backend)
    a = torch.randn(M, K, generator=g).to(dev)
    b = torch.randn(N, K, generator=g).to(dev) if trans_b else torch.randn(K, N, generator=g).to(dev)
    idx = [0, M // 2, M - 1]
    alone = [fixed_gemm(a[i:i + 1], b, trans_b, backend)[0] for i in idx]
    pad = torch.randn(5, K, generator=g).to(dev)
    for rows, at in ((a, idx), (a[: M // 2 + 1], idx[:2]), (torch.cat([pad, a]), [i + 5 for i in idx])):
        c = fixed_gemm(rows, b, trans_b, backend)
        for x, i in zip(alone, at):
            assert torch.equal(c[i], x), (rows.shape[0], i)


@pytest.mark.skipif(not HAVE_C, reason="needs the native extension")
def test_fixed_gemm_checks_its_arguments():
    op = torch.ops.rlhf_kernels.fixed_gemm
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="must share K"):
        op(a, torch.randn(5, 3), True)
    with pytest.raises(RuntimeError, match="must share K"):
        op(a, b, False)
    with pytest.raises(RuntimeError, match="b must have a's dtype"):
        op(a, b.double(), True)
    with pytest.raises(RuntimeError, match="expected float32 or float64"):
        op(a.half(), b.half(), True)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op(a, torch.randn(4, 5).T, True)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        op(a[0], b, True)
