"""PPO-MCTS value-guided decoding (Liu et al. 2023, docs/algorithms.md §9).

For every generated token, `simulations` rounds of select → expand → evaluate → backup run on a
tree rooted at the current prefix; then the token is chosen from the root's visit counts. There is
one tree per prompt row and all rows search in lock-step, so a round costs one batched forward per
model whatever the number of prompts.

Per node s and child slot a (the top_k tokens by prior):
- prior      P(s,a) = softmax(z_s / te)[a] over the whole vocabulary, kept for the k largest and not
             renormalised (as the released code)
- select     a* = argmax_a Q(s,a) + c_puct·P(s,a)·sqrt(N(s)) / (1 + N(s,a)); ties go to the higher prior
- expand     a new node s' gets its evaluation V(s') (critic; terminal nodes: see `node_stats`),
             N(s') = 1, and all its children's Q initialised to V(s') (the parent's V, not 0)
- backup     leaf to root: Q(s,a) ← V(s') (kl_coef = 0) or γ·V(s') + klpen(s,a); N(s,a) += 1;
             V(s) = (V_eval(s) + Σ_a N(s,a)·Q(s,a)) / N(s), N(s) = 1 + Σ_a N(s,a): the visit-weighted
             average of the node's own evaluation and its children's Q (what the released code's
             running update computes)
- decide     π(a) ∝ N(root,a)^(1/td_t), td_t = td·(1 − t/max_new_tokens) with anneal_td; argmax
             unless do_sample (then sampled, optionally top-p filtered)

Terminal nodes (ending in <eos>, or holding the max_new_tokens-th token) are never expanded: a
simulation that selects one backs its fixed value up again. The released code expands children
below <eos> but never lets them change that node's value, so the statistics are the same; this
only saves the forward.

KL step penalty (kl_coef > 0; ⚠ the paper and the released code differ, §9):
- "logratio" (default, the paper): klpen(s,a) = −β·(log π(a|s) − log π_ref(a|s)), the k1 token
  reward PPO trained the critic against, so Q = r + γ·V(s') is on the critic's scale;
- "probdiff" (the released code): klpen(s,a) = −β·(π(a|s) − π_ref(a|s)), a probability difference.
Both use the prior temperature te; `clamp_kl` clamps the difference at >= 0 (code's clamp_kl).

KV cache (`Prefix`): for each model (policy, critic, and the reference policy and reward model when
they are used) the K/V of every layer for the current root prefixes (prompt + tokens decided so far)
is kept in one transformers DynamicCache. It is built once from the prompts and grows by one token
per decision (a one-token forward per model, which also evaluates the new root). Expanding a node
runs only the tokens between the root and the new node (its depth d ≤ simulations, usually 1-3
tokens) on top of that cache and then crops the cache back to the root: no simulation re-encodes
the prompt or the decided tokens. Nodes keep no K/V of their own: re-running ≤ d path tokens
costs less than storing per-node caches and concatenating them along the path.
"""
import inspect

import torch

from ..core.models import ScalarModel
from ..tasks import sentiment


class Prefix:
    """One model's K/V cache of the root prefixes and its incremental evaluation. `model` is a causal
    LM (evaluates to next-token logits) or a ScalarModel (evaluates to its scalar, e.g. V(prefix))."""

    def __init__(self, model):
        lm = model.lm if isinstance(model, ScalarModel) else model
        self.body = lm.base_model
        if isinstance(model, ScalarModel):
            self.head = lambda h: model.head(h).squeeze(-1).float() - model.offset
        else:
            lm_head = lm.get_output_embeddings()
            self.head = lambda h: lm_head(h).float()
        self.cache, self.length = None, 0
        # transformers 5 renamed the forward's cache argument to `cache` (`past_key_values` is deprecated and
        # goes in 5.40); older releases only know `past_key_values`
        params = inspect.signature(self.body.forward).parameters
        self.cache_key = "cache" if "cache" in params else "past_key_values"

    def _forward(self, ids):
        # no attention mask: prompts are unpadded, and the right-padding of shorter paths in
        # `expand` comes after each row's last real token, which causal attention never lets it see
        pos = torch.arange(self.length, self.length + ids.shape[1], device=ids.device).expand_as(ids)
        out = self.body(input_ids=ids, position_ids=pos, use_cache=True, **{self.cache_key: self.cache})
        return out.last_hidden_state

    def start(self, ids):
        """Encode the prompts [B, P] (unpadded); the evaluation at their last token."""
        from transformers import DynamicCache
        self.cache, self.length = DynamicCache(), 0
        h = self._forward(ids)
        self.length = ids.shape[1]
        return self.head(h[:, -1])

    def advance(self, tokens):
        """Append one decided token per row [B] to the root; the evaluation of the new root."""
        h = self._forward(tokens[:, None])
        self.length += 1
        return self.head(h[:, -1])

    def keep(self, rows):
        """Drop the rows that finished: keep `rows` (indices) of the cache."""
        self.cache.batch_select_indices(rows)

    def expand(self, paths, lengths):
        """The evaluation after root + paths[b, :lengths[b]] for each row (paths right-padded);
        the root cache is left as it was."""
        h = self._forward(paths)
        self.cache.crop(-paths.shape[1])  # a negative count removes tokens in every transformers version
        return self.head(h[torch.arange(len(paths), device=h.device), lengths - 1])


class Tree:
    """`rows` independent search trees with at most `nodes` nodes each, node 0 the root. Node
    statistics are [rows, nodes] tensors, child statistics [rows, nodes, k] (child slot a of node s
    holds token[s, a], its prior, Q(s,a), N(s,a), klpen(s,a) and the child's node index or -1)."""

    def __init__(self, rows, nodes, k, device="cpu"):
        B, M, K = rows, nodes, k
        i64, f64 = dict(dtype=torch.long, device=device), dict(dtype=torch.float64, device=device)
        self.rows = torch.arange(B, device=device)
        self.parent = torch.full((B, M), -1, **i64)
        self.slot = torch.full((B, M), -1, **i64)          # the child slot of the parent leading here
        self.terminal = torch.zeros(B, M, dtype=torch.bool, device=device)
        self.v_eval = torch.zeros(B, M, **f64)             # the node's own evaluation
        self.value = torch.zeros(B, M, **f64)              # V(s): the visit-weighted average
        self.visits = torch.zeros(B, M, **i64)             # N(s)
        self.token = torch.zeros(B, M, K, **i64)
        self.prior = torch.zeros(B, M, K, **f64)
        self.q = torch.zeros(B, M, K, **f64)
        self.n = torch.zeros(B, M, K, **i64)               # N(s, a)
        self.klpen = torch.zeros(B, M, K, **f64)
        self.child = torch.full((B, M, K), -1, **i64)

    def set_node(self, rows, node, value, tokens, priors, klpen, terminal):
        """Create `node` in `rows` from its evaluation: V(s') = value, N(s') = 1, and every child's
        Q initialised to the node's own V (the PPO-MCTS choice; standard MCTS starts them at 0)."""
        value = value.to(self.value.dtype)
        self.v_eval[rows, node] = value
        self.value[rows, node] = value
        self.visits[rows, node] = 1
        self.terminal[rows, node] = terminal
        self.token[rows, node] = tokens
        self.prior[rows, node] = priors.to(self.prior.dtype)
        self.klpen[rows, node] = klpen.to(self.klpen.dtype)
        self.q[rows, node] = value[:, None]

    def attach(self, rows, parent, slot, node):
        self.child[rows, parent, slot] = node
        self.parent[rows, node] = parent
        self.slot[rows, node] = slot

    def puct(self, node, c_puct):
        """[rows, k] scores Q(s,a) + c·P(s,a)·sqrt(N(s))/(1 + N(s,a)) of the children of node[r]."""
        r = self.rows
        explore = c_puct * self.prior[r, node] * self.visits[r, node].double().sqrt()[:, None] / (1 + self.n[r, node])
        return self.q[r, node] + explore

    def select(self, c_puct):
        """Descend from the root by PUCT in every row until an unexpanded child or a terminal node.
        Returns (parent, slot, leaf, path, length): rows with leaf == -1 stopped at the unexpanded
        child `slot` of node `parent`; the others at the terminal node `leaf`. path[r, :length[r]]
        are the tokens from the root to where row r stopped (<pad> after)."""
        r = self.rows
        node, parent, slot = (torch.zeros_like(r) for _ in range(3))
        leaf, length = torch.full_like(r, -1), torch.zeros_like(r)
        going = torch.ones_like(r, dtype=torch.bool)
        path = []
        while going.any():
            a = self.puct(node, c_puct).argmax(-1)  # first maximum: slots are sorted by prior
            nxt = self.child[r, node, a]
            path.append(torch.where(going, self.token[r, node, a], sentiment.PAD))
            length += going.long()
            new = going & (nxt < 0)
            term = going & (nxt >= 0) & self.terminal[r, nxt.clamp(min=0)]
            parent, slot = torch.where(new, node, parent), torch.where(new, a, slot)
            leaf = torch.where(term, nxt, leaf)
            going &= ~(new | term)
            node = torch.where(going, nxt, node)
        return parent, slot, leaf, torch.stack(path, 1), length

    def backup(self, leaf, revisited, kl_coef=0.0, gamma=1.0):
        """Back the values up from leaf[r] to the root of every row; `revisited` rows selected an
        existing terminal node (its value is fixed; only its visit count grows)."""
        r = self.rows
        self.visits[r[revisited], leaf[revisited]] += 1
        node = leaf.clone()
        while True:
            up = node > 0
            if not up.any():
                return
            rr, c = r[up], node[up]
            p, a = self.parent[rr, c], self.slot[rr, c]
            v = self.value[rr, c]
            self.q[rr, p, a] = gamma * v + self.klpen[rr, p, a] if kl_coef > 0 else v
            self.n[rr, p, a] += 1
            n = self.n[rr, p]
            self.value[rr, p] = (self.v_eval[rr, p] + (n * self.q[rr, p]).sum(-1)) / (1 + n.sum(-1))
            self.visits[rr, p] = 1 + n.sum(-1)
            node[up] = p


def node_stats(cfg, logits, value, is_eos=None, truncated=None, rm_value=None, ref_logits=None):
    """(tokens, priors, klpen, value) of new nodes from the models' outputs at their last token.
    The value is the critic's V(s'), except at terminal nodes: one ending in <eos> takes
    reward_gain·RM(s') + reward_bias when a reward model is given (else V: the paper's App. A.4
    approximation); one that used the last allowed token without <eos> takes no_eos_value (unless
    none), the no-EOS score PPO trained the critic with, since the critic never saw that state."""
    logp = torch.log_softmax(logits.double() / cfg.te, -1)
    lp, tokens = logp.topk(min(cfg.top_k, logp.shape[-1]), -1)  # sorted, highest prior first
    priors = lp.exp()
    klpen = torch.zeros_like(priors)
    if cfg.kl_coef > 0:
        ref_lp = torch.log_softmax(ref_logits.double() / cfg.te, -1).gather(-1, tokens)
        diff = lp - ref_lp if cfg.klpen == "logratio" else priors - ref_lp.exp()
        if cfg.clamp_kl:
            diff = diff.clamp(min=0)
        klpen = -cfg.kl_coef * diff
    value = value.double()
    if rm_value is not None and is_eos is not None:
        value = torch.where(is_eos, cfg.reward_gain * rm_value.double() + cfg.reward_bias, value)
    if cfg.no_eos_value is not None and truncated is not None:
        value = torch.where(truncated & ~is_eos, torch.full_like(value, cfg.no_eos_value), value)
    return tokens, priors, klpen, value


def decision_temperature(cfg, t):
    """td at token t (0-based): annealed linearly towards 0 over the generation if anneal_td."""
    return cfg.td * (1 - t / cfg.max_new_tokens) if cfg.anneal_td else cfg.td


def visit_distribution(counts, td, top_p=1.0):
    """π(a) ∝ N^(1/td), computed in log space (no overflow as td → 0), then top-p filtered."""
    probs = (counts.double().log() / td).softmax(-1)
    if top_p < 1:
        p, idx = probs.sort(-1, descending=True)
        keep = p.cumsum(-1) - p < top_p  # the smallest prefix reaching top_p (the first always kept)
        probs = torch.zeros_like(probs).scatter(-1, idx, p * keep)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def decide(counts, cfg, t, generator=None):
    """The chosen child slot per row from the root's visit counts [B, k]."""
    if not cfg.do_sample:
        return counts.argmax(-1)  # td only reshapes the distribution; the argmax ignores it
    probs = visit_distribution(counts, decision_temperature(cfg, t), cfg.top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def search(models, root, t, cfg):
    """The tree after `simulations` rounds from the current roots; `root` holds each model's
    evaluation of the root prefixes, `t` the number of tokens decided so far."""
    first = next(iter(root.values()))
    rows, dev = len(first), first.device
    tokens, priors, klpen, value = node_stats(cfg, root["policy"], root["critic"], ref_logits=root.get("ref"))
    tree = Tree(rows, cfg.simulations + 1, tokens.shape[1], dev)
    r = tree.rows
    tree.set_node(r, 0, value, tokens, priors, klpen, terminal=torch.zeros_like(r, dtype=torch.bool))
    for sim in range(cfg.simulations):
        parent, slot, leaf, path, length = tree.select(cfg.c_puct)
        grow = leaf < 0
        if grow.any():
            node = sim + 1
            length = torch.where(grow, length, 1)  # rows that revisit a terminal node: a dummy token
            path = path[:, :int(length.max())]
            last = path[r, length - 1]
            is_eos = last == sentiment.EOS
            truncated = t + length >= cfg.max_new_tokens
            need = ["policy", "critic"] + (["ref"] if "ref" in models else [])
            if "rm" in models and (is_eos & grow).any():
                need.append("rm")
            out = {name: models[name].expand(path, length) for name in need}
            tokens, priors, klpen, value = node_stats(cfg, out["policy"], out["critic"], is_eos, truncated,
                                                      out.get("rm"), out.get("ref"))
            g = r[grow]
            tree.set_node(g, node, value[g], tokens[g], priors[g], klpen[g], (is_eos | truncated)[g])
            tree.attach(g, parent[g], slot[g], node)
            leaf = torch.where(grow, node, leaf)
        tree.backup(leaf, ~grow, cfg.kl_coef, cfg.gamma)
    return tree


@torch.no_grad()
def generate(policy, critic, prompts, cfg, reward_model=None, ref=None, generator=None):
    """Responses [B, max_new_tokens] (<pad> after the first <eos>) of `prompts` [B, P] (unpadded)
    decoded by PPO-MCTS with `cfg` (a config.GenerateConfig)."""
    B, T = len(prompts), cfg.max_new_tokens
    out = torch.full((B, T), sentiment.PAD, dtype=torch.long, device=prompts.device)
    models = {"policy": Prefix(policy), "critic": Prefix(critic)}
    if cfg.kl_coef > 0:
        if ref is None:
            raise ValueError("kl_coef > 0 needs the reference policy (ref)")
        models["ref"] = Prefix(ref)
    if reward_model is not None:
        models["rm"] = Prefix(reward_model)
    root = {name: m.start(prompts) for name, m in models.items()}
    alive = torch.arange(B, device=prompts.device)  # the output row of each search row
    for t in range(T):
        tree = search(models, root, t, cfg)
        slot = decide(tree.n[:, 0], cfg, t, generator)
        tok = tree.token[tree.rows, 0, slot]
        out[alive, t] = tok
        going = tok != sentiment.EOS
        if t == T - 1 or not going.any():
            break
        if not going.all():
            idx = going.nonzero().squeeze(1)
            for m in models.values():
                m.keep(idx)
            alive, tok = alive[idx], tok[idx]
        root = {name: m.advance(tok) for name, m in models.items()}
    return out
