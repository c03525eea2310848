"""The vocabulary-parallel head: rk.linear_logprobs / rk.logprobs_from_logits with process_group=...

Each rank of the group holds rows [offset, offset + V_r) of the vocabulary (weight[V_r, H], or logits[..., V_r]);
hidden, tokens (global ids), temperature and the upstream gradients are the same on every rank, as in a
Megatron-style tensor-parallel LM head. The result is the single-process op on the gathered vocabulary.

Forward. Each rank runs the local op of its backend on its shard: per row the shard's log-sum-exp L_r, its
entropy H_r (of the softmax restricted to the shard) and, on the rank that owns the token, the target logit.
One all_gather of those 2 (3 with entropy) floats per row, then every rank combines the R partials in rank
order, so the outputs are bitwise identical on every rank:
    L = M + log Σ_r exp(L_r − M)  (M = max_r L_r),   logp = z_target − L  (z_target = the owner's logp_r + L_r),
    H = Σ_r π_r·(H_r − log π_r)    with π_r = exp(L_r − L), the shard's share of the probability mass.
Backward. The local backward of every backend recomputes p = exp(z − lse) per column and adds the target's
indicator where the token's column is; fed the global L and H it yields the gradient of the global log-prob and
entropy restricted to the shard, for rows whose target this rank owns. A row whose target lives on another rank
must get the −p part of the log-prob gradient but no indicator, which no backend's interface can say, so such
rows are sent with local column 0 as their target and the indicator is taken out again here: its hidden-gradient
term g·w_0/T (times the softcap's slope) is subtracted, and the gradient of weight row 0 and bias entry 0
(logits column 0 for logprobs_from_logits) is recomputed directly, O(N·H) (O(N)) work next to the head's
O(N·V_r·H). The hidden gradient is summed over the group with one all_reduce.

Communication per call, for N rows, R ranks, float32 (float64 for float64 inputs):
    forward   one all_gather: each rank sends 2·N floats (3·N with return_entropy) and receives (R − 1) times that;
              with validate=True, first one all_gather of 2 int64 per rank (the shard layout, checked on every rank)
    backward  linear_logprobs: one all_reduce of the hidden gradient, N·H floats (the same as a Megatron LM head's
              input gradient); logprobs_from_logits: none (the logits gradient is local to the shard)
Nothing of size [N, V] is ever sent.

linear_logprobs compacts ignored rows away first where the single-process op does so (CPU tensors, or validate=True),
and N above counts only the others; elsewhere, and always in logprobs_from_logits, ignored rows stay in, flagged to
the kernels with LOCAL_IGNORE (they do no work there).

Extra memory beyond the local op's (rlhf_kernels/ops/linear_logprobs.py states that): a few vectors of N floats,
and in backward, for bf16/fp16 inputs, the hidden gradient widened to fp32 (N·H floats, next to the kernel's own
result), which the correction and the all_reduce update in place; the corrections widen at most ROWS_PER_STEP rows
of a bf16/fp16 hidden at a time. The all_reduce runs in fp32 for bf16/fp16 inputs (twice the bytes of a bf16 one,
for a sum rounded once).

Every rank must make the same calls with the same hidden, tokens and temperature, and compute the same loss from
the outputs (their upstream gradients must agree: each rank back-propagates its own copy). Head options that do not
compose with process_group yet (issue 11's sampler replay top_k/top_p, batch_invariant) are to be refused through
not_composable. torch.compile of a call with process_group and double backward are not supported.
"""
import math

import torch

from . import _head

LOCAL_IGNORE = -1  # the ignore_index of the local calls: never a local column, and not the foreign rows' column 0


def not_composable(option):
    """The error for a head option that does not yet work with process_group (hook for the options of issue 11:
    a public op calls this when such an option is set together with process_group)."""
    raise ValueError(f"{option} does not compose with process_group yet: use the single-process head "
                     f"(process_group=None) for {option}")


def _dist():
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group needs torch.distributed to be initialized (torch.distributed.init_process_group)")
    return dist


def shard_layout(group, v_local, vocab_offset, device, validate):
    """(offset, V or None): where this rank's shard starts, and the whole vocabulary's size when validate=True.

    validate=True gathers every rank's (offset, V_r) and checks that the shards tile [0, V) without gap or overlap;
    every rank sees the same gathered layout, so a bad layout raises on all ranks alike (no rank left waiting)."""
    dist = _dist()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group")
    if vocab_offset is None:
        offset = rank * v_local  # the even split of a ColumnParallelLinear head
    else:
        if isinstance(vocab_offset, bool) or not isinstance(vocab_offset, int):
            raise TypeError(f"vocab_offset must be an int or None, got {type(vocab_offset).__name__}")
        offset = vocab_offset
    if not validate:
        if offset < 0:
            raise ValueError(f"vocab_offset must be >= 0, got {offset}")
        return offset, None
    meta = torch.tensor([offset, v_local], dtype=torch.int64, device=device)
    parts = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(parts, meta, group=group)
    shards = sorted((int(p[0]), int(p[1]), r) for r, p in enumerate(parts))
    negative = [(r, o) for o, _, r in shards if o < 0]
    if negative:
        raise ValueError(f"vocab_offset must be >= 0; (rank, vocab_offset) = {negative}")
    end = 0
    for o, n, _ in shards:
        if o != end:
            what = "a gap" if o > end else "an overlap"
            raise ValueError(f"the vocabulary shards of process_group must tile [0, V) in order of vocab_offset; "
                             f"there is {what} at {min(o, end)}: (rank, vocab_offset, rows) = "
                             f"{[(r_, o_, n_) for o_, n_, r_ in sorted(shards, key=lambda s: s[2])]}")
        end = o + n
    return offset, end


def local_tokens(tok, offset, v_local, ignore_index):
    """(local column, owned, active): a row this rank owns gets its column in the shard; a row owned elsewhere (or
    nowhere) gets column 0, its indicator removed in backward; an ignored row gets LOCAL_IGNORE."""
    active = tok != ignore_index
    col = tok - offset
    owned = active & (col >= 0) & (col < v_local)
    local = torch.where(owned, col, torch.where(active, torch.zeros_like(col), torch.full_like(col, LOCAL_IGNORE)))
    return local.contiguous(), owned, active


def combine(group, lse_r, tgt_r, ent_r):
    """(lse, target logit, entropy or None) of the whole vocabulary from each rank's shard partials, the same bits
    on every rank: one all_gather, then the R partials folded in rank order. tgt_r is NaN on rows this rank does not
    own; the target logit is the first non-NaN one (NaN if no rank owns the token)."""
    dist = _dist()
    world = dist.get_world_size(group)
    mine = torch.stack([lse_r, tgt_r] + ([ent_r] if ent_r is not None else []))
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine.contiguous(), group=group)
    m = parts[0][0]
    for p in parts[1:]:
        m = torch.maximum(m, p[0])
    s = torch.zeros_like(m)
    for p in parts:
        s = s + torch.exp(p[0] - m)
    lse = m + torch.log(s)
    tgt = parts[0][1]
    for p in parts[1:]:
        tgt = torch.where(torch.isnan(tgt), p[1], tgt)
    if ent_r is None:
        return lse, tgt, None
    ent = torch.zeros_like(lse)
    for p in parts:
        log_pi = p[0] - lse
        pi = torch.exp(log_pi)
        ent = ent + torch.where(pi > 0, pi * (p[2] - log_pi), torch.zeros_like(pi))
    return lse, tgt, ent


# ---- the per-column math the corrections (and the reference backend) need, in the accumulation dtype ----

def _inv_t(temperature, temps, n, acc, device):
    if temps is not None:
        return temps.to(acc).reciprocal()
    return torch.full((n,), temperature, dtype=acc, device=device).reciprocal()


def _capped(y, cap):
    """(cap(y), d cap/dy) with cap(y) = c·tanh(y/c), or (y, 1) without a softcap."""
    if not cap:
        return y, torch.ones_like(y)
    c = cap * torch.tanh(y / cap)
    u = c / cap
    return c, 1 - u * u


def _dz(y, inv_t, cap, lse, ent, g1, g2, is_target):
    """d(g1·logp + g2·H)/dy for raw logits y (any trailing shape after the row dim), with the global lse and entropy
    per row and the target indicator is_target: (g1·(1[target] − p) − g2·p·(log p + H))/T · cap'(y)."""
    c, slope = _capped(y, cap)
    it = inv_t.view(-1, *([1] * (y.dim() - 1)))
    col = (lambda v: v.view(-1, *([1] * (y.dim() - 1))))
    lp = c * it - col(lse)
    p = torch.exp(lp)
    d = col(g1) * (is_target.to(y.dtype) - p)
    if g2 is not None:
        d = d - col(g2) * torch.where(p > 0, p * (lp + col(ent)), torch.zeros_like(p))
    return d * it * slope


def _ref_state(x, col, owned, inv_t, cap, want_ent):
    """The local op of the reference backend on logits x[n, V_r] (accumulation dtype): (target logit, lse, entropy)."""
    z = _capped(x, cap)[0] * inv_t[:, None]
    lse = torch.logsumexp(z, -1)
    tgt = z.gather(-1, col.clamp(min=0)[:, None]).squeeze(-1)
    tgt = torch.where(owned, tgt, torch.full_like(tgt, math.nan))
    ent = None
    if want_ent:
        p = torch.exp(z - lse[:, None])
        ent = lse - torch.where(p > 0, p * z, torch.zeros_like(p)).sum(-1)
    return tgt, lse, ent


def _ref_dz(x, col, owned, active, inv_t, cap, lse, ent, g1, g2):
    is_t = owned[:, None] & (torch.arange(x.shape[-1], device=x.device)[None, :] == col[:, None])
    d = _dz(x, inv_t, cap, lse, ent, g1, g2, is_t)
    return torch.where(active[:, None], d, torch.zeros_like(d))


class _Cfg:
    """What a vocab-parallel call fixes besides its tensors."""

    def __init__(self, name, temperature, temps, cap, group, want_ent, acc):
        self.name, self.temperature, self.temps, self.cap = name, temperature, temps, cap
        self.group, self.want_ent, self.acc = group, want_ent, acc


def _grads_in(cfg, g_logp, g_ent, active, unowned, n, device):
    """The upstream gradients the local backward gets: 0 on ignored rows, and no log-prob gradient on rows whose
    token no rank owns (validate=False, out of range: logp is NaN, a constant, as in the single-process op)."""
    zero = torch.zeros(n, dtype=cfg.acc, device=device)
    g1 = zero if g_logp is None else torch.where(active & ~unowned, g_logp.to(cfg.acc), zero)
    g2 = None if g_ent is None or not cfg.want_ent else torch.where(active, g_ent.to(cfg.acc), zero)
    return g1.contiguous(), None if g2 is None else g2.contiguous()


ROWS_PER_STEP = 4096  # rows of a bf16/fp16 hidden widened at a time by the corrections, not all N at once


def _rows_dot(h, v, acc):
    """h[n, H] @ v[H] in the accumulation dtype, widening at most ROWS_PER_STEP rows of h at a time."""
    if h.dtype == acc:
        return h @ v
    return torch.cat([h[i:i + ROWS_PER_STEP].to(acc) @ v for i in range(0, h.shape[0], ROWS_PER_STEP)] +
                     [v.new_zeros(0)])


def _weighted_row_sum(c, h, acc):
    """c[n] @ h[n, H] in the accumulation dtype, widening at most ROWS_PER_STEP rows of h at a time."""
    if h.dtype == acc:
        return c @ h
    out = torch.zeros(h.shape[1], dtype=acc, device=h.device)
    for i in range(0, h.shape[0], ROWS_PER_STEP):
        out += c[i:i + ROWS_PER_STEP] @ h[i:i + ROWS_PER_STEP].to(acc)
    return out


class _LinearVP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, col, owned, active, cfg):
        temps = cfg.temps
        if cfg.name == "reference":
            x = h.to(cfg.acc) @ w.to(cfg.acc).T
            if b is not None:
                x = x + b
            inv_t = _inv_t(cfg.temperature, temps, h.shape[0], cfg.acc, h.device)
            tgt_r, lse_r, ent_r = _ref_state(x, col, owned, inv_t, cfg.cap, cfg.want_ent)
        else:
            op = (torch.ops.rlhf_kernels.linear_logprobs_fwd_triton if cfg.name == "triton"
                  else torch.ops.rlhf_kernels.linear_logprobs_fwd)
            logp_r, ent_r, lse_r = op(h, w, b, col, cfg.temperature, LOCAL_IGNORE, _head.chunk_bytes(), temps, cfg.cap)
            tgt_r = torch.where(owned, logp_r + lse_r, torch.full_like(logp_r, math.nan))
            ent_r = ent_r if cfg.want_ent else None
        lse, tgt, ent = combine(cfg.group, lse_r, tgt_r, ent_r)
        zero = torch.zeros_like(lse)
        logp = torch.where(active, tgt - lse, zero)
        ent = zero if ent is None else torch.where(active, ent, zero)
        lse = torch.where(active, lse, zero)
        ctx.save_for_backward(h, w, b, col, owned, active, torch.isnan(tgt) & active, lse, ent)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent):
        h, w, b, col, owned, active, unowned, lse, ent = ctx.saved_tensors
        cfg = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and b is not None
        if (g_logp is None and g_ent is None) or not (need_h or need_w or need_b):
            return (None,) * 7
        n, acc = h.shape[0], cfg.acc
        g1, g2 = _grads_in(cfg, g_logp, g_ent, active, unowned, n, h.device)
        inv_t = _inv_t(cfg.temperature, cfg.temps, n, acc, h.device)
        if cfg.name == "reference":
            ha, wa = h.to(acc), w.to(acc)
            x = ha @ wa.T
            if b is not None:
                x = x + b
            dz = _ref_dz(x, col, owned, active, inv_t, cfg.cap, lse, ent, g1, g2)
            dh = dz @ wa if need_h else None
            dw = (dz.T @ ha).to(w.dtype) if need_w else None
            db = dz.sum(0) if need_b else None
        else:
            op = (torch.ops.rlhf_kernels.linear_logprobs_bwd_triton if cfg.name == "triton"
                  else torch.ops.rlhf_kernels.linear_logprobs_bwd)
            dh, dw, db = op(g1, g2, h, w, b, col, lse, ent, cfg.temperature, LOCAL_IGNORE, need_h, need_w, need_b,
                            _head.chunk_bytes(), cfg.temps, cfg.cap)
            # rows owned elsewhere were sent with column 0 as their target: take its indicator out again
            w0 = w[0].to(acc)
            y0 = _rows_dot(h, w0, acc) + (b[0] if b is not None else 0)
            slope0 = _capped(y0, cfg.cap)[1]
            if need_h:
                foreign = torch.where(owned, torch.zeros_like(g1), g1 * inv_t * slope0)
                dh = dh.to(acc).addr_(foreign, w0, alpha=-1)  # in place: no [N, H] outer product
            if need_w or need_b:
                dz0 = _dz(y0, inv_t, cfg.cap, lse, ent, g1, g2, owned & (col == 0))
                dz0 = torch.where(active, dz0, torch.zeros_like(dz0))
                if need_w:
                    dw[0] = _weighted_row_sum(dz0, h, acc).to(dw.dtype)
                if need_b:
                    db[0] = dz0.sum()
        if need_h:
            _dist().all_reduce(dh, group=cfg.group)
            dh = dh.to(h.dtype)
        return (dh if need_h else None, dw if need_w else None, db if need_b else None) + (None,) * 4


class _LogitsVP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, col, owned, active, cfg):
        n = col.shape[0]
        temps = cfg.temps
        if cfg.name == "reference":
            inv_t = _inv_t(cfg.temperature, temps, n, cfg.acc, x.device)
            tgt_r, lse_r, ent_r = _ref_state(x.reshape(n, -1).to(cfg.acc), col, owned, inv_t, cfg.cap, cfg.want_ent)
        else:
            op = (torch.ops.rlhf_kernels.logprobs_from_logits_fwd_triton if cfg.name == "triton"
                  else torch.ops.rlhf_kernels.logprobs_from_logits_fwd)
            logp_r, ent_r, lse_r = op(x, col.view(x.shape[:-1]), cfg.temperature, LOCAL_IGNORE, cfg.want_ent,
                                      None if temps is None else temps.view(x.shape[:-1]), cfg.cap)
            logp_r, lse_r = logp_r.reshape(n), lse_r.reshape(n)
            ent_r = ent_r.reshape(n) if cfg.want_ent else None
            tgt_r = torch.where(owned, logp_r + lse_r, torch.full_like(logp_r, math.nan))
        lse, tgt, ent = combine(cfg.group, lse_r, tgt_r, ent_r)
        zero = torch.zeros_like(lse)
        logp = torch.where(active, tgt - lse, zero)
        ent = zero if ent is None else torch.where(active, ent, zero)
        lse = torch.where(active, lse, zero)
        ctx.save_for_backward(x, col, owned, active, torch.isnan(tgt) & active, lse, ent)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent):
        x, col, owned, active, unowned, lse, ent = ctx.saved_tensors
        cfg = ctx.cfg
        if g_logp is None and g_ent is None:
            return (None,) * 5
        n = col.shape[0]
        g1, g2 = _grads_in(cfg, g_logp, g_ent, active, unowned, n, x.device)
        inv_t = _inv_t(cfg.temperature, cfg.temps, n, cfg.acc, x.device)
        if cfg.name == "reference":
            d = _ref_dz(x.reshape(n, -1).to(cfg.acc), col, owned, active, inv_t, cfg.cap, lse, ent, g1, g2)
            return (d.to(x.dtype).view(x.shape),) + (None,) * 4
        op = (torch.ops.rlhf_kernels.logprobs_from_logits_bwd_triton if cfg.name == "triton"
              else torch.ops.rlhf_kernels.logprobs_from_logits_bwd)
        shape = x.shape[:-1]
        grad = op(g1.view(shape), None if g2 is None else g2.view(shape), x, col.view(shape), lse.view(shape),
                  ent.view(shape), cfg.temperature, LOCAL_IGNORE, None if cfg.temps is None else cfg.temps.view(shape),
                  cfg.cap)
        # rows owned elsewhere were sent with column 0 as their target: recompute that column without the indicator
        g2d = grad.view(n, -1)
        x0 = x.reshape(n, -1)[:, 0].to(cfg.acc)
        d0 = _dz(x0, inv_t, cfg.cap, lse, ent, g1, g2, torch.zeros_like(owned))
        g2d[:, 0] = torch.where(active & ~owned, d0.to(grad.dtype), g2d[:, 0])
        return (grad,) + (None,) * 4


def _acc(*tensors):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_tokens(tokens, V, ignore_index):
    if V is not None and tokens.numel() and not torch.compiler.is_compiling():
        bad = ((tokens < 0) | (tokens >= V)) & (tokens != ignore_index)
        if bool(bad.any()):
            raise ValueError(f"tokens must lie in [0, {V}) (the whole vocabulary of process_group) or equal "
                             f"ignore_index={ignore_index}; found {tokens[bad][0].item()} (pass validate=False to "
                             "get NaN at such positions instead of this check)")


def linear_logprobs(hidden, weight, tokens, bias, temperature, temps, cap, ignore_index, return_entropy, validate,
                    name, group, vocab_offset):
    """The vocab-parallel linear_logprobs, on arguments the public op has validated (all but the tokens' range)."""
    if group is None:
        raise ValueError("vocab_offset needs process_group (the group whose ranks hold the vocabulary shards)")
    offset, V = shard_layout(group, weight.shape[0], vocab_offset, hidden.device, validate)
    _check_tokens(tokens, V, ignore_index)
    acc = _acc(hidden, weight, bias)
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H)
    tok = tokens.reshape(-1).to(torch.int64)
    temps = None if temps is None else temps.reshape(-1)
    # the same rows on every rank: tokens are the same everywhere
    keep, tok, h, temps = _head.compact(tok, ignore_index, validate, h, temps)
    b = None if bias is None else bias.to(acc).contiguous()
    if name == "triton":
        w = weight.contiguous()
        h = h.contiguous()
    elif name == "reference":
        w = weight
    else:  # one storage dtype for the cpu/cuda kernels, as the single-process op
        store = _head.storage_dtype(acc, hidden, weight)
        h, w = h.to(store).contiguous(), weight.to(store).contiguous()
    col, owned, active = local_tokens(tok, offset, weight.shape[0], ignore_index)
    cfg = _Cfg(name, temperature, None if temps is None else temps.contiguous(), cap, group, return_entropy, acc)
    logp, ent = _LinearVP.apply(h, w, b, col, owned, active, cfg)
    logp, ent = _head.expand(keep, tokens.numel(), logp, ent)
    logp = logp.view(tokens.shape)
    return (logp, ent.view(tokens.shape)) if return_entropy else logp


def logprobs_from_logits(logits, tokens, temperature, temps, cap, ignore_index, return_entropy, validate, name, group,
                         vocab_offset):
    """The vocab-parallel logprobs_from_logits, on arguments the public op has validated (all but the tokens' range)."""
    if group is None:
        raise ValueError("vocab_offset needs process_group (the group whose ranks hold the vocabulary shards)")
    offset, V = shard_layout(group, logits.shape[-1], vocab_offset, logits.device, validate)
    _check_tokens(tokens, V, ignore_index)
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    tok = tokens.reshape(-1).to(torch.int64)
    col, owned, active = local_tokens(tok, offset, logits.shape[-1], ignore_index)
    cfg = _Cfg(name, temperature, None if temps is None else temps.reshape(-1).contiguous(), cap, group,
               return_entropy, _acc(logits))
    logp, ent = _LogitsVP.apply(x, col, owned, active, cfg)
    logp = logp.view(tokens.shape)
    return (logp, ent.view(tokens.shape)) if return_entropy else logp

