"""Plain-torch reference of every op: the specification the fast backends are tested against.

These functions take already-validated arguments (the public functions in `rlhf_kernels.ops`
validate) and are written for clarity, not speed. Autograd flows through plain torch.
Results are float32, or float64 when the inputs are float64.
"""
import math

import torch

from ._choices import Aggregation, DPOLossType, KLEstimator, ScorePosition, values

KL_ESTIMATORS = values(KLEstimator)
AGGREGATIONS = values(Aggregation)
DPO_LOSS_TYPES = values(DPOLossType)
SCORE_POSITIONS = values(ScorePosition)


def compute_dtype(*tensors):
    """float64 if any input is float64, else float32 (bf16/fp16 inputs are computed in fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _scale(z, tokens, temperature, softcap):
    """softcap (z <- c·tanh(z/c), Gemma-2), then temperature: a number or a tensor broadcastable to tokens.shape
    (one value per token, no gradient)."""
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.detach().to(z.dtype).expand(tokens.shape).unsqueeze(-1)
    return z / temperature


def _per_token(x, tokens, dtype):
    """A number or a tensor broadcastable to tokens.shape -> a tensor of tokens.shape (no gradient)."""
    if not isinstance(x, torch.Tensor):
        x = torch.tensor(x, dtype=dtype, device=tokens.device)
    return x.detach().to(device=tokens.device, dtype=dtype).expand(tokens.shape)


def replay_kept(z, tokens, top_k=None, top_p=None):
    """The sampler's kept set, a bool [..., V] mask over the scaled logits z, in vLLM's order: the top k
    (every z equal to the k-th largest is kept; k <= 0 or k >= V keeps all), then over what is left the
    softmax sorted ascending, dropping each token whose cumulative probability is <= 1 − p (p = 1: off).
    A token tied with a kept token is kept (the cumulative probability of a group of equal z is the one at
    its end), so the kept set is always {z >= threshold} for one threshold per row; the largest z is kept."""
    V = z.shape[-1]
    kept = z > float("-inf")
    if top_k is not None:
        k = _per_token(top_k, tokens, torch.int64)
        on = (k > 0) & (k < V)
        desc = z.sort(-1, descending=True).values
        kth = desc.gather(-1, (k.clamp(1, V) - 1).unsqueeze(-1))
        kept = kept & (~on.unsqueeze(-1) | (z >= kth))
    if top_p is not None:
        p = _per_token(top_p, tokens, z.dtype)
        zk = torch.where(kept, z, torch.full_like(z, float("-inf")))
        asc = zk.sort(-1).values
        cum = torch.softmax(asc, -1).cumsum(-1)
        # the cumulative probability at the end of each group of equal values
        last = torch.searchsorted(asc.contiguous(), asc.contiguous(), right=True) - 1
        cum_group = cum.gather(-1, last)
        keep_sorted = (cum_group > (1 - p).unsqueeze(-1)) | (asc == asc[..., -1:])
        big = torch.full_like(asc, float("inf"))
        theta = torch.where(keep_sorted, asc, big).amin(-1, keepdim=True)
        on = (p < 1).unsqueeze(-1)
        kept = kept & (~on | (zk >= theta))
    return kept


def logprobs_from_logits(logits, tokens, temperature=1.0, ignore_index=-100, return_entropy=False, softcap=None,
                         top_k=None, top_p=None, batch_invariant=False):
    if batch_invariant:
        return _row_by_row(lambda z, tok, t, k, p: logprobs_from_logits(z, tok, t, ignore_index, return_entropy,
                                                                        softcap, k, p),
                           logits, tokens, (temperature, top_k, top_p), return_entropy, compute_dtype(logits))
    z = _scale(logits.to(compute_dtype(logits)), tokens, temperature, softcap)
    V = z.shape[-1]
    replay = top_k is not None or top_p is not None
    if replay:  # the kept set is piecewise constant in z: no gradient flows through its choice
        kept = replay_kept(z.detach(), tokens, top_k, top_p)
        z = torch.where(kept, z, torch.full_like(z, float("-inf")))
    logp_all = torch.log_softmax(z, dim=-1)
    valid = tokens != ignore_index
    in_range = (tokens >= 0) & (tokens < V)
    safe = torch.where(valid & in_range, tokens, torch.zeros_like(tokens)).long()
    lp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    if replay:  # a token outside its kept set: −inf, a constant (no gradient)
        tok_kept = kept.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        lp = torch.where(tok_kept, lp, torch.full_like(lp, float("-inf")))
    nan = torch.full_like(lp, float("nan"))
    lp = torch.where(valid, torch.where(in_range, lp, nan), torch.zeros_like(lp))
    if not return_entropy:
        return lp
    p = logp_all.exp()
    # p·log p with p = 0 (−inf logits) contributes 0, and so does its gradient (zero log p itself, not the
    # product: where() would send 0·(−inf) = NaN back); a NaN row stays NaN
    ent = -(p * torch.where(p == 0, torch.zeros_like(p), logp_all)).sum(-1)
    ent = torch.where(valid, ent, torch.zeros_like(ent))
    return lp, ent


def linear_logprobs(hidden, weight, tokens, bias=None, temperature=1.0, ignore_index=-100,
                    return_entropy=False, softcap=None, top_k=None, top_p=None, batch_invariant=False):
    dt = compute_dtype(hidden, weight, bias)
    if batch_invariant:
        # logits of one row as an elementwise product and a sum over H of a [V, H] tensor: the same ops on
        # the same shapes whatever the batch (a matmul over all rows may pick its kernel by the row count)
        w, b = weight.to(dt), None if bias is None else bias.to(dt)

        def one(h, tok, t, k, p):
            z = (w * h.to(dt)).sum(-1)
            return logprobs_from_logits(z if b is None else z + b, tok, t, ignore_index, return_entropy, softcap, k, p)
        return _row_by_row(one, hidden, tokens, (temperature, top_k, top_p), return_entropy, dt)
    logits = hidden.to(dt) @ weight.to(dt).T
    if bias is not None:
        logits = logits + bias.to(dt)
    return logprobs_from_logits(logits, tokens, temperature, ignore_index, return_entropy, softcap, top_k, top_p)


def _row_by_row(one, x, tokens, per_token, return_entropy, dtype):
    """batch_invariant: `one(x_row, token, *settings)` for each position on its own, stacked (x is [..., D]);
    `per_token` holds the settings (temperature, top_k, top_p), each a number, None or a tensor broadcastable
    to tokens.shape. Each row runs the same ops on tensors of the same shapes whatever the rest of the batch,
    so its result cannot depend on the batch; slow, and meant for tests on small shapes."""
    flat_x, flat_t = x.reshape(-1, x.shape[-1]), tokens.reshape(-1)
    cols = [a.detach().expand(tokens.shape).reshape(-1) if isinstance(a, torch.Tensor) else None for a in per_token]
    outs = [one(flat_x[i], flat_t[i], *(a if c is None else c[i] for a, c in zip(per_token, cols)))
            for i in range(flat_t.numel())]
    if not outs:
        empty = x.new_zeros(tokens.shape, dtype=dtype)
        return (empty, empty.clone()) if return_entropy else empty
    if return_entropy:
        return torch.stack([o[0] for o in outs]).view(tokens.shape), torch.stack([o[1] for o in outs]).view(tokens.shape)
    return torch.stack(outs).view(tokens.shape)


def _expm1_minus(x):
    """e^x − 1 − x, exact to rounding also near 0, where the direct form cancels (at |x| = 1e-9 it
    has no correct digit even in float64): the Taylor series x²·Σ_{n≥2} x^(n−2)/n! on |x| ≤ 1 (terms
    to n = 18 reach float64 precision there), expm1(x) − x elsewhere."""
    small = x.abs() <= 1
    xs = torch.where(small, x, torch.zeros_like(x))
    series = xs * xs * sum(xs ** (n - 2) / math.factorial(n) for n in range(2, 19))
    return torch.where(small, series, torch.expm1(x) - x)


def token_kl(logp, ref_logp, estimator="k1", clamp=None):
    dt = compute_dtype(logp, ref_logp)
    d = logp.to(dt) - ref_logp.to(dt)
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d * d
    else:  # k3 with log r = ref − logp = −d
        kl = _expm1_minus(-d)  # e^{−d} − 1 + d
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl


def _last_valid_index(mask):
    """Index of each row's last valid position (−1 for a row with none)."""
    T = mask.shape[-1]
    idx = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask, idx, torch.full_like(idx, -1)).amax(-1)


def token_rewards(score, mask, logp=None, ref_logp=None, kl_coef=0.0, kl_estimator="k1", dense=None,
                  dense_coef=1.0, dense_clip=None, score_position="last"):
    mask = mask.bool()
    dt = compute_dtype(score, logp, ref_logp, dense)
    r = torch.zeros(mask.shape, dtype=dt, device=mask.device)
    if kl_coef != 0.0:
        # the KL in the promoted dtype too (an fp64 score with fp32 log-probs computes everything in fp64)
        r = r - kl_coef * token_kl(logp.to(dt), ref_logp.to(dt), kl_estimator)
    if dense is not None:
        d = dense_coef * dense.to(dt)
        if dense_clip is not None:
            d = d.clamp(-dense_clip, dense_clip)
        r = r + d
    r = torch.where(mask, r, torch.zeros_like(r))
    last = _last_valid_index(mask)
    T = mask.shape[-1]
    pos = last if score_position == "last" else torch.clamp(last + 1, max=T - 1)
    has = last >= 0
    onehot = torch.nn.functional.one_hot(pos.clamp(min=0), T).bool() & has.unsqueeze(-1)
    return r + torch.where(onehot, score.to(dt).unsqueeze(-1), torch.zeros_like(r))


def gae(rewards, values, mask, gamma=1.0, lam=0.95, dones=None):
    # dones: at a valid done position the next valid position belongs to another episode, so its V and A
    # are cut (δ_t = r_t + γ(1−d_t)V_next − V_t, A_t = δ_t + γλ(1−d_t)A_next); a masked position has no
    # step, so a done there has no effect.
    mask = mask.bool()
    dt = compute_dtype(rewards, values)
    r, v = rewards.to(dt), values.to(dt)
    adv = torch.zeros_like(r)
    next_v = torch.zeros_like(r[..., 0])
    next_a = torch.zeros_like(r[..., 0])
    for t in reversed(range(r.shape[-1])):
        m = mask[..., t]
        nv, na = next_v, next_a
        if dones is not None:
            cut = dones[..., t].bool()
            nv, na = torch.where(cut, 0.0, next_v), torch.where(cut, 0.0, next_a)
        delta = r[..., t] + gamma * nv - v[..., t]
        a = delta + gamma * lam * na
        adv[..., t] = torch.where(m, a, torch.zeros_like(a))
        next_v = torch.where(m, v[..., t], next_v)
        next_a = torch.where(m, a, next_a)
    ret = torch.where(mask, adv + v, torch.zeros_like(adv))
    return adv, ret


def masked_whiten(x, mask, shift_mean=True, unbiased=False, eps=1e-8):
    mask = mask.bool()
    x = x.to(compute_dtype(x))
    zero = torch.zeros_like(x)
    n = mask.sum()
    if n == 0:
        return zero
    mean = torch.where(mask, x, zero).sum() / n
    sq = torch.where(mask, (x - mean) ** 2, zero).sum()
    var = sq / (n - 1).clamp(min=1) if unbiased else sq / n
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, zero)


def aggregate(loss, mask, aggregation, denominator=None):
    """Aggregate per-token `loss[..., T]` over valid positions; all-masked gives 0. `denominator` (a number
    or a 0-dim tensor) replaces the divisor: Σ mask for token-mean, the rows with a valid token for seq-mean-*."""
    mask = mask.bool()
    lm = torch.where(mask, loss, torch.zeros_like(loss))
    if aggregation == "token-sum":
        return lm.sum()
    if aggregation == "token-mean":
        return lm.sum() / (mask.sum().clamp(min=1) if denominator is None else denominator)
    row_n = mask.sum(-1)
    has = row_n > 0
    rows = has.sum().clamp(min=1) if denominator is None else denominator
    row_sum = lm.sum(-1)
    if aggregation == "seq-mean-token-sum":
        return row_sum.sum() / rows
    return (row_sum / row_n.clamp(min=1)).sum() / rows  # rows with no valid token add 0


def _masked_mean(x, mask):
    mask = mask.bool()
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


def _masked_zero(x, mask):
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def _masked_max(x, mask):
    """Max over the valid positions of a non-negative x; 0 when none is valid (also for an empty x)."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x)).reshape(-1)
    return torch.cat([x, x.new_zeros(1)]).max()


def ppo_policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=None, dual_clip=None,
                    aggregation="token-mean", ratio_level="token", loss_type="ppo", weights=None, ref_logp=None,
                    kl_coef=0.0, kl_estimator="k3", denominator=None):
    # advantages: the shape of logp, or one per row ([...] for logp [..., T]) broadcast over its tokens.
    # weights and ref_logp are constants (detached); ref_logp only adds the KL term and its stat.
    clip_high = clip_low if clip_high is None else clip_high
    mask = mask.bool()
    dt = compute_dtype(logp, old_logp, advantages, weights, ref_logp)
    adv = advantages.to(dt)
    if adv.dim() < logp.dim():
        adv = adv.unsqueeze(-1).expand(logp.shape)
    # zero the masked positions first: garbage there (inf, NaN) must not reach the gradient as 0·inf
    logp, old, adv = (_masked_zero(x, mask) for x in (logp.to(dt), old_logp.to(dt), adv))
    log_ratio = logp - old
    if ratio_level == "sequence":  # GSPO: the row's length-normalised log-ratio, on each valid token
        row_mean = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = _masked_zero(row_mean.expand(logp.shape), mask)
    ratio = torch.exp(log_ratio)
    if loss_type == "ppo":
        l1 = -adv * ratio
        l2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
        clipped = l2 > l1
        loss = torch.where(clipped, l2, l1)
        if dual_clip is not None:
            cap = -dual_clip * adv
            loss = torch.where((adv < 0) & (loss > cap), cap, loss)
    else:  # cispo: the truncated ratio is a constant weight on the REINFORCE term −A·logp
        clipped = ratio > 1 + clip_high
        loss = -ratio.detach().clamp(max=1 + clip_high) * adv * logp
    if weights is not None:
        w = _masked_zero(weights.detach().to(dt), mask)
        loss = loss * w
    if ref_logp is not None:
        kl = token_kl(logp, _masked_zero(ref_logp.detach().to(dt), mask), kl_estimator)
        if kl_coef != 0.0:
            loss = loss + kl_coef * kl
    out = aggregate(loss, mask, aggregation, denominator)
    with torch.no_grad():
        stats = {"clipfrac": _masked_mean(clipped.to(dt), mask).float(),
                 "approx_kl": _masked_mean(0.5 * (logp - old) ** 2, mask).float(),
                 "ratio_mean": _masked_mean(ratio, mask).float(),
                 "ratio_max": _masked_max(ratio, mask).float()}
        if ref_logp is not None:
            stats["kl"] = _masked_mean(kl, mask).float()
        if weights is not None:
            stats["weight_mean"] = _masked_mean(w, mask).float()
    return out, stats


def ppo_value_loss(values, old_values, returns, mask, clip=0.2, aggregation="token-mean"):
    dt = compute_dtype(values, old_values, returns)
    v, vo, ret = (_masked_zero(x.to(dt), mask) for x in (values, old_values, returns))
    e1 = (v - ret) ** 2
    if clip is None:
        loss, clipped = 0.5 * e1, torch.zeros_like(e1, dtype=torch.bool)
    else:
        vc = vo + (v - vo).clamp(-clip, clip)
        e2 = (vc - ret) ** 2
        clipped = e2 > e1
        loss = 0.5 * torch.where(clipped, e2, e1)
    out = aggregate(loss, mask, aggregation)
    with torch.no_grad():
        stats = {"vf_clipfrac": _masked_mean(clipped.to(dt), mask).float()}
    return out, stats


def dpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta=0.1, loss_type="sigmoid",
             label_smoothing=0.0):
    dt = compute_dtype(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    c, r = chosen_logp.to(dt), rejected_logp.to(dt)
    cr, rr = ref_chosen_logp.to(dt), ref_rejected_logp.to(dt)
    h = (c - cr) - (r - rr)
    eps = label_smoothing
    ls = torch.nn.functional.logsigmoid
    if loss_type == "sigmoid":
        losses = -(1 - eps) * ls(beta * h) - eps * ls(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # robust
        losses = ((1 - eps) * -ls(beta * h) + eps * ls(-beta * h)) / (1 - 2 * eps)
    return losses, (beta * (c - cr)).detach(), (beta * (r - rr)).detach()


def group_advantages(scores, group_size=None, group_ids=None, baseline="mean", scale="std", eps=1e-6):
    # Groups: consecutive blocks of group_size, or equal labels of group_ids. Per group: n members, sum S,
    # mean μ = S/n, std σ = sqrt(Σ(r − μ)² / (n − 1)) (0 for a group of one).
    r = scores.to(compute_dtype(scores))
    if group_ids is None:
        idx = torch.arange(r.shape[0], device=r.device) // group_size
    else:
        idx = torch.unique(group_ids, return_inverse=True)[1]
    groups = int(idx.max()) + 1 if idx.numel() else 0
    zeros = torch.zeros(groups, dtype=r.dtype, device=r.device)
    n = zeros.index_add(0, idx, torch.ones_like(r))[idx]
    s = zeros.index_add(0, idx, r)[idx]
    mean = s / n
    m2 = zeros.index_add(0, idx, (r - mean) ** 2)[idx]
    std = torch.sqrt(m2 / (n - 1).clamp(min=1))
    if baseline == "mean":
        adv = r - mean
    elif baseline == "leave_one_out":
        adv = r - (s - r) / (n - 1).clamp(min=1)  # the mean of the other members
    else:
        adv = r
    if scale == "std":
        adv = adv / (std + eps)
    if baseline != "none":
        adv = torch.where(n > 1, adv, torch.zeros_like(adv))
    return adv


def rollout_correction(old_logp, rollout_logp, mask, level="token", mode="truncate", low=None, high=2.0):
    # ρ = π_old / π_rollout per token, or of the whole row (product, or its geometric mean) on its valid
    # tokens; the stats use the token_kl estimators with logp = old_logp, ref_logp = rollout_logp.
    mask = mask.bool()
    dt = compute_dtype(old_logp, rollout_logp)
    d = _masked_zero(old_logp.to(dt) - rollout_logp.to(dt), mask)
    if level == "token":
        log_ratio = d
    else:
        log_ratio = d.sum(-1, keepdim=True)
        if level == "geometric":
            log_ratio = log_ratio / mask.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = log_ratio.expand_as(d)
    ratio = torch.exp(log_ratio)
    lo = 0.0 if low is None else low  # ρ > 0: no lower bound is the bound 0
    hi = float("inf") if high is None else high
    if mode == "truncate":
        weights, keep = ratio.clamp(lo, hi), torch.ones_like(mask)
    else:
        keep = (ratio >= lo) & (ratio <= hi)
        weights = torch.where(keep, ratio, torch.zeros_like(ratio))
    mask_out = mask & keep
    weights = _masked_zero(weights, mask_out if mode == "mask" else mask)
    n = mask.sum().clamp(min=1)
    stats = {"mismatch_k1": _masked_mean(d, mask).float(),
             "mismatch_k3": _masked_mean(token_kl(old_logp.to(dt), rollout_logp.to(dt), "k3"), mask).float(),
             "masked_fraction": ((mask.sum() - mask_out.sum()) / n).float(),
             "weight_mean": _masked_mean(weights, mask).float()}
    return weights.detach(), mask_out, {k: v.detach() for k, v in stats.items()}
