"""Helpers shared by the Triton kernels of the row ops."""
import triton
import triton.language as tl


@triton.jit
def _scalar(x, dt: tl.constexpr):
    # A float kernel argument (fp32 on GPU, a Python float under the interpreter, where `.to` does not
    # exist) as a scalar of the data's dtype, so fp64 data is computed in fp64.
    return tl.full([], 0.0, dt) + x
