"""`--tp_head=true`: the policy's LM head sharded by vocabulary rows across the ranks of a torchrun job, with
the vocabulary-parallel head (rlhf_kernels/ops/vocab_parallel.py) inside the data-parallel trainer
(docs/distributed.md, "Training on torchrun").

Each rank keeps rows [offset, offset + V_r) of lm_head.weight (and bias) as its trainable parameter
(ShardedHead, in place of the model's output embedding; a frozen reference's head is sharded alike, so that
policy and reference log-probs go through the same op). DDP ignores it and the optimizer updates the shard,
so the head's weight, gradient and AdamW moments are 1/W of the whole on every rank; the whole head exists
only while `whole()` gathers it (sampling, saving the model).

The vocabulary-parallel op needs the same rows on every rank, while data parallelism gives each rank its own.
So the head call (`ShardedHead.logprobs`) all-gathers the job's hidden states and tokens, runs the op on the
gathered rows with this rank's shard, and keeps this rank's rows of the outputs:
  forward   hidden [n, ...] -> all_gather -> [W·n, ...] -> op -> log-probs [W·n, ...] -> this rank's rows [n, ...]
  backward  the W ranks' upstream gradients are all-gathered (KeepRows), so every rank back-propagates the same
            gradient through the op, as the op requires; the op's hidden gradient is then the job's sum, the
            same on every rank, and each rank keeps its rows of it (GatherRows): no reduction of its own.
The shard's gradient is then that of Σ_r W·loss_r (every rank's loss is scaled by W for DDP's average,
parallel.Distributed.scale), so it is multiplied by 1/W (ScaleGrad): what DDP's average does to a replica.
"""
import contextlib

import torch

import rlhf_kernels as rk

from .config import ConfigError


def split(vocab, world):
    """[(offset, rows)] of each rank: the first vocab % world ranks hold one row more."""
    base, extra = divmod(vocab, world)
    rows = [base + (r < extra) for r in range(world)]
    return [(sum(rows[:r]), rows[r]) for r in range(world)]


def check_untied(lm):
    """A head tied to the input embedding cannot be sharded alone: the embedding lookup needs every row."""
    head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    if emb is not None and head.weight is getattr(emb, "weight", None):
        raise ConfigError("tp_head with a model whose lm_head.weight is tied to its input embedding "
                          f"({type(lm).__name__}, tie_word_embeddings): the embedding needs the whole matrix on "
                          "every rank; use a model with an untied head (e.g. tiny-llama) or tp_head=false")


class ScaleGrad(torch.autograd.Function):
    """The identity whose backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def all_rows(x, group):
    """The rank-major concatenation along dim 0 of every rank's `x` (equal shapes)."""
    import torch.distributed as dist
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


class GatherRows(torch.autograd.Function):
    """all_rows; backward keeps this rank's rows of a gradient that is already the job's (the vocabulary-parallel
    op all-reduces it)."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist
        rank = dist.get_rank(group)
        ctx.rows = slice(rank * x.shape[0], (rank + 1) * x.shape[0])
        return all_rows(x, group)

    @staticmethod
    def backward(ctx, g):
        return g[ctx.rows].contiguous(), None


class KeepRows(torch.autograd.Function):
    """This rank's rows of an output that every rank holds whole; backward gathers the ranks' gradients, so the op
    behind it gets the same upstream gradient on every rank."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        n = x.shape[0] // world
        ctx.group = group
        return x[rank * n:(rank + 1) * n].clone()

    @staticmethod
    def backward(ctx, g):
        return all_rows(g, ctx.group), None


class ShardedHead(torch.nn.Module):
    """Rows [offset, offset + rows) of an LM head (weight and bias) on this rank of `group`."""

    def __init__(self, head, group=None):
        super().__init__()
        import torch.distributed as dist
        self.group = group if group is not None else dist.group.WORLD  # process_group=None means no group to the op
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.vocab, self.hidden = head.weight.shape
        self.layout = split(self.vocab, self.world)
        self.offset, self.rows = self.layout[self.rank]
        keep = slice(self.offset, self.offset + self.rows)
        self.weight = torch.nn.Parameter(head.weight.detach()[keep].clone(), requires_grad=head.weight.requires_grad)
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach()[keep].clone(),
                                                                 requires_grad=bias.requires_grad)

    def forward(self, h):
        raise RuntimeError("the LM head is sharded (tp_head): its log-probs go through models.token_logprobs, and "
                           "sampling or saving through tp_head.whole(), which gathers it")

    def logprobs(self, h, tokens, temperature=1.0, entropy=False):
        """rk.linear_logprobs of this rank's rows h [n, ..., H], tokens [n, ...] against the whole vocabulary, through
        the vocabulary-parallel op on the job's gathered rows (module docstring)."""
        import torch.distributed as dist
        shape = torch.tensor(tokens.shape, dtype=torch.int64, device=_comm_device(tokens))
        shapes = [torch.empty_like(shape) for _ in range(self.world)]
        dist.all_gather(shapes, shape, group=self.group)
        if any(not torch.equal(s, shapes[0]) for s in shapes):  # every rank sees the same shapes: all raise
            raise ValueError(f"tp_head: every rank's head call must have the same shape; got "
                             f"{[tuple(s.tolist()) for s in shapes]}")
        hs = GatherRows.apply(h, self.group)
        ts = all_rows(tokens, self.group)
        scale = 1.0 / self.world
        out = rk.linear_logprobs(hs, ScaleGrad.apply(self.weight, scale), ts,
                                 bias=None if self.bias is None else ScaleGrad.apply(self.bias, scale),
                                 temperature=temperature, return_entropy=entropy, process_group=self.group,
                                 vocab_offset=self.offset, validate=False)
        if entropy:
            return tuple(KeepRows.apply(t, self.group) for t in out)
        return KeepRows.apply(out, self.group)

    @torch.no_grad()
    def gather(self, t):
        """The whole [V, ...] tensor from every rank's rows `t` [rows, ...] of it (a collective)."""
        import torch.distributed as dist
        most = max(r for _, r in self.layout)
        padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=_comm_device(t))
        padded[:self.rows] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:r] for p, (_, r) in zip(parts, self.layout)]).to(t.device)

    def local(self, t):
        """This rank's rows of a whole [V, ...] tensor."""
        return t[self.offset:self.offset + self.rows]

    def full_linear(self):
        """An nn.Linear holding the gathered head (a collective), frozen."""
        w = self.gather(self.weight)
        # skip_init: no random initialisation, which would draw from the generator a sampler just seeded
        lin = torch.nn.utils.skip_init(torch.nn.Linear, self.hidden, self.vocab, bias=self.bias is not None,
                                       device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.gather(self.bias))
        return lin.requires_grad_(False)


def _comm_device(t):
    return t.device if t.device.type == "cuda" else torch.device("cpu")


def shard(lm, group=None):
    """Replace `lm`'s output embedding by this rank's ShardedHead of it; return the head."""
    check_untied(lm)
    head = ShardedHead(lm.get_output_embeddings(), group)
    lm.set_output_embeddings(head)
    return head


def sharded(module):
    """[(qualified name, ShardedHead)] inside `module`."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, ShardedHead)]


@contextlib.contextmanager
def whole(module):
    """Within the block every ShardedHead inside `module` is replaced by the whole head (gathered from every rank: a
    collective, so every rank enters the block), for sampling and saving; the shards are put back after it."""
    swapped = []
    try:
        for name, head in sharded(module):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name)
            setattr(parent, attr, head.full_linear())
            swapped.append((parent, attr, head))
        yield module
    finally:
        for parent, attr, head in swapped:
            setattr(parent, attr, head)


# checkpoints hold the whole head (the single-process format) -----------------------------------------

def _heads(modules, optimizer):
    """[(module name, state-dict key, optimizer state index, parameter, ShardedHead)] of every sharded head
    parameter in `modules`: the keys of the checkpoint that hold the whole head."""
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    return [(name, f"{prefix}.{pname}", index.get(id(p)), p, head)
            for name, m in modules.items() if isinstance(m, torch.nn.Module)
            for prefix, head in sharded(m) for pname, p in head.named_parameters(recurse=False)]


def whole_heads(states, optim_sd, modules, optimizer):
    """The single-process checkpoint: every sharded head parameter, and its optimizer state, gathered whole
    (collectives, in the same order on every rank)."""
    for name, key, i, p, head in _heads(modules, optimizer):
        states[name][key] = head.gather(states[name][key])
        st = optim_sd["state"].get(i)
        if st is not None:  # a new dict: optimizer.state_dict() shares the live one
            optim_sd["state"][i] = {k: head.gather(v) if _per_row(v, p) else v for k, v in st.items()}
    return states, optim_sd


def head_shards(model_states, optim_state, modules, optimizer):
    """The inverse of whole_heads on this rank: its rows of every whole head tensor of a checkpoint."""
    heads = _heads(modules, optimizer)
    if not heads:
        return model_states, optim_state
    model_states = {n: dict(sd) for n, sd in model_states.items()}
    optim_state = {**optim_state, "state": dict(optim_state["state"])}
    for name, key, i, p, head in heads:
        model_states[name][key] = head.local(model_states[name][key])
        st = optim_state["state"].get(i)
        if st is not None:
            optim_state["state"][i] = {k: head.local(v) if _per_row(v, p, whole=head.vocab) else v
                                       for k, v in st.items()}
    return model_states, optim_state


def _per_row(v, p, whole=None):
    """Whether optimizer state `v` has one entry per element of `p` (AdamW's moments; not its step count)."""
    shape = p.shape if whole is None else (whole, *p.shape[1:])
    return isinstance(v, torch.Tensor) and v.shape == shape
