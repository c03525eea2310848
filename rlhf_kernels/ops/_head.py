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


def compact(tok, ignore_index, validate, hidden, *per_row):
    """(keep, tok, hidden, *per_row) with only the valid rows (keep = their indices, or None when every row is
    valid or compaction is skipped: see valid_rows). hidden keeps its gradient path (TakeRows); per_row entries
    may be None."""
    keep = valid_rows(tok, ignore_index, validate)
    if keep is None:
        return (None, tok, hidden) + per_row
    return ((keep, tok.index_select(0, keep), TakeRows.apply(hidden, keep))
            + tuple(None if x is None else x.index_select(0, keep) for x in per_row))


def expand(keep, n, *outs):
    """The inverse of compact for outputs: each [n_valid] output written into zeros of [n] (ignored rows give 0)."""
    if keep is None:
        return outs
    return tuple(o.new_zeros(n).index_copy(0, keep, o) for o in outs)


def storage_dtype(acc, hidden, weight):
    """The one dtype hidden and weight reach the cpu/cuda kernels in: fp64 for fp64 math; bf16/fp16 stay so (widened
    chunk by chunk in the kernels) when both share it; with mixed dtypes only the narrower side is widened."""
    if acc == torch.float64:
        return torch.float64
    return hidden.dtype if hidden.dtype == weight.dtype else torch.float32
