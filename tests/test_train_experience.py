"""PPO's experience step (score → no-<eos> penalty → token rewards with the KL penalty → GAE → batch
whitening of the advantages) on a hand-built batch: the sampler, log-probs, values and scores are
replaced by fixed numbers, and PPO.make_experience must give the advantages, returns and KL worked
out by hand below. B = 2 rows, T = 4 response positions; row 1 has a hole at t = 1 and no <eos>."""
import math

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels.train import ppo
from rlhf_kernels.train.core.commands import build
from rlhf_kernels.train.decode import rollout

from train_helpers import PPO_FAST

MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]]).bool()
HAS_EOS = torch.tensor([True, False])
# 9.0 and 7.0 sit at masked positions: the experience step must never read them
OLD = torch.tensor([[-1.0, -2.0, -0.5, 9.0], [-0.3, 9.0, -1.2, -0.7]])
REF = torch.tensor([[-1.5, -1.0, -0.5, 7.0], [-0.1, 7.0, -1.0, -0.9]])
VALUES = torch.tensor([[0.2, 0.4, 0.6, 9.0], [0.5, 7.0, 0.3, -0.2]])
SCORE = torch.tensor([0.7, 0.4])
KL_COEF, GAMMA, LAM = 0.1, 0.9, 0.5

# By hand. r_t = −β·(old − ref) at valid t, plus the score at the row's last valid position; row 1 has no
# <eos>, so its score 0.4 is replaced by penalty_value = −1.
#   row 0: old − ref = (0.5, −1.0, 0.0)      → r = (−0.05, 0.1, 0.0 + 0.7)
#   row 1: old − ref = (−0.2, hole, −0.2, 0.2) → r = (0.02, 0, 0.02, −0.02 − 1)
# GAE with γ = 0.9, γλ = 0.45, each valid position linked to the next valid one (the hole skipped):
#   row 0: t=2  δ = 0.7 − 0.6                  = 0.1    A = 0.1
#          t=1  δ = 0.1 + 0.9·0.6 − 0.4        = 0.24   A = 0.24 + 0.45·0.1   = 0.285
#          t=0  δ = −0.05 + 0.9·0.4 − 0.2      = 0.11   A = 0.11 + 0.45·0.285 = 0.23825
#   row 1: t=3  δ = −1.02 − (−0.2)             = −0.82  A = −0.82
#          t=2  δ = 0.02 + 0.9·(−0.2) − 0.3    = −0.46  A = −0.46 + 0.45·(−0.82)  = −0.829
#          t=0  δ = 0.02 + 0.9·0.3 − 0.5       = −0.21  A = −0.21 + 0.45·(−0.829) = −0.58305  (links to t=2)
# returns = A + V (taken before whitening), 0 at masked positions.
ADV = torch.tensor([[0.23825, 0.285, 0.1, 0.0], [-0.58305, 0.0, -0.829, -0.82]])
RET = torch.tensor([[0.23825 + 0.2, 0.285 + 0.4, 0.1 + 0.6, 0.0], [-0.58305 + 0.5, 0.0, -0.829 + 0.3, -0.82 - 0.2]])
REWARDS = torch.tensor([[-0.05, 0.1, 0.7, 0.0], [0.02, 0.0, 0.02, -1.02]])
KL_SEQ = [0.5 - 1.0 + 0.0, -0.2 - 0.2 + 0.2]  # Σ_t (old − ref) over each row's valid positions


def whiten_by_hand(adv):
    """(A − mean)/sqrt(var + 1e-8) over the 6 valid advantages, biased variance (N+), mean not kept."""
    valid = [a for row, m in zip(ADV.tolist(), MASK.tolist()) for a, ok in zip(row, m) if ok]
    mean = sum(valid) / len(valid)
    var = sum((a - mean) ** 2 for a in valid) / len(valid)
    return torch.where(MASK, (adv - mean) / math.sqrt(var + 1e-8), torch.zeros_like(adv))


def trainer_with_fixed_batch(tmp_path, monkeypatch, **keys):
    cfg = build("ppo", None, {**PPO_FAST, "out": str(tmp_path), "batch_size": 2, "minibatches": 1,
                              "micro_batch_size": 1, "max_new_tokens": 4, "kl_coef": KL_COEF, "gamma": GAMMA,
                              "lam": LAM, **keys})
    trainer = ppo.PPO(cfg)
    prompts = torch.tensor([[1, 4, 5, 3], [1, 6, 7, 3]])
    responses = torch.tensor([[20, 21, 2, 0], [20, 22, 23, 24]])
    monkeypatch.setattr(rollout, "sample", lambda *a, **k: rollout.Samples(prompts, responses, MASK, HAS_EOS))

    def logprobs(model, s, rows, entropy=False):
        lp = (OLD if model is trainer.policy else REF)[rows]
        return (lp, torch.zeros_like(lp)) if entropy else lp

    trainer.logprobs = logprobs
    trainer.values = lambda s, rows: VALUES[rows]
    trainer.score = lambda s: SCORE.clone()
    seen = {}
    gae = rk.gae

    def spy_gae(rewards, values, mask, **kw):  # the rewards GAE is given, checked below
        seen["rewards"], seen["mask"] = rewards.clone(), mask.clone()
        return gae(rewards, values, mask, **kw)

    monkeypatch.setattr(rk, "gae", spy_gae)
    return trainer, seen


@pytest.mark.parametrize("whiten", [True, False])
def test_make_experience_by_hand(tmp_path, monkeypatch, whiten):
    trainer, seen = trainer_with_fixed_batch(tmp_path, monkeypatch, whiten_advantages=whiten)
    ex = trainer.make_experience(1, torch.Generator().manual_seed(0))
    assert torch.allclose(seen["rewards"], REWARDS, atol=1e-6, rtol=0) and torch.equal(seen["mask"], MASK)
    assert torch.allclose(ex["returns"], RET, atol=1e-6, rtol=0)
    assert torch.allclose(ex["advantages"], whiten_by_hand(ADV) if whiten else ADV, atol=1e-5, rtol=0)
    assert ex["kl"] == pytest.approx(sum(KL_SEQ) / 2, abs=1e-6)
    assert torch.equal(ex["old_logp"], OLD) and torch.equal(ex["values"], VALUES)
    assert ex["stats"]["score"] == pytest.approx(float(SCORE.mean()))  # the raw score, before the penalty
