"""What the linear head's paths share (the plain head in linear_logprobs.py, the sampler replay in _replay_head.py, the
vocabulary-parallel head in vocab_parallel.py): the temporaries budget of the fast backends and the compaction of
ignored rows out of the GEMMs. A module of its own so that those three import it, not each other."""
import os

import torch

DEFAULT_CHUNK_BYTES = 256 << 20


def chunk_bytes():
    """The temporaries budget of the fast backends, from $RLHF_KERNELS_CHUNK_BYTES (bytes)."""
    v = os.environ.get("RLHF_KERNELS_CHUNK_BYTES")
    if not v:
        return DEFAULT_CHUNK_BYTES
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"RLHF_KERNELS_CHUNK_BYTES must be a positive integer (bytes), got {v!r}") from None
    if n <= 0:
        raise ValueError(f"RLHF_KERNELS_CHUNK_BYTES must be a positive integer (bytes), got {v!r}")
    return n



class TakeRows(torch.autograd.Function):
    """x[keep] for unique indices; backward writes the gradient rows into zeros with index_copy (autograd's
    index_select backward, index_add, runs a scatter_add that costs more than the whole head on CPU here)."""

    @staticmethod
    def forward(ctx, x, keep):
        ctx.save_for_backward(keep)
        ctx.rows = x.shape[0]
        return x.index_select(0, keep)

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved_tensors
        return g.new_zeros((ctx.rows,) + tuple(g.shape[1:])).index_copy_(0, keep, g), None


def valid_rows(tok, ignore_index, validate):
    """The indices of the rows to compute, or None for all of them. Counting the valid rows needs the
    count on the host: free for CPU tensors; on a GPU it is a sync, paid only with validate=True (which syncs
    for the token check anyway) and skipped in compiled code (the shape would depend on data)."""
    if torch.compiler.is_compiling() or (tok.device.type != "cpu" and not validate):
        return None
    valid = tok != ignore_index
    keep = valid.nonzero().view(-1)
    return None if keep.numel() == tok.numel() else keep
