"""Triton kernels and their launchers, one module per op. Launchers go through
torch.library.wrap_triton so that torch.compile can trace the triton_op wrappers in rlhf_kernels.ops."""
