"""`--top_k` / `--top_p` on the sampling trainers: the rollouts are drawn with the cut, the policy's rollout
log-probs replay it (finite on every sampled token, renormalised over the kept set), the reference's do not,
and a step runs; bad values are config errors."""
import pytest
import torch

from rlhf_kernels.train import grpo, ppo
from rlhf_kernels.train.core import config, models
from rlhf_kernels.train.core.commands import build
from rlhf_kernels.train.core.runlog import Run

from train_helpers import FAST, PPO_FAST

GRPO_FAST = {**FAST, "steps": 1, "batch_size": 2, "group_size": 4, "minibatches": 2, "micro_batch_size": 2,
             "kl_coef": 0.05}


@pytest.mark.parametrize("name,cls,keys", [("grpo", grpo.GRPO, GRPO_FAST), ("ppo", ppo.PPO, {**PPO_FAST, "steps": 1})])
def test_rollout_logprobs_replay_the_cut(tmp_path, name, cls, keys):
    t = cls(build(name, None, {**keys, "top_k": 3, "top_p": 0.8, "temperature": 1.5, "out": str(tmp_path / "r")}))
    t.run = Run(t.cfg, name)
    ex = t.make_experience(1, torch.Generator().manual_seed(3))
    s, old = ex["samples"], ex["old_logp"]
    assert s.mask.any() and torch.isfinite(old[s.mask]).all()
    # every sampled token is among the 3 most probable at its position: the sampler used the cut
    with torch.no_grad():
        h = models.hidden_states(t.policy, s.ids, s.attn)[:, s.start - 1:-1]
        logits = t.policy.get_output_embeddings()(h)
    rank = (logits > logits.gather(-1, s.responses[..., None])).sum(-1)
    assert (rank[s.mask] < 3).all()
    full = torch.log_softmax(logits / 1.5, -1).gather(-1, s.responses[..., None])[..., 0]
    assert (old[s.mask] > full[s.mask] + 1e-4).all()  # renormalised over a smaller kept set
    want = models.token_logprobs(t.policy, s.ids, s.attn, s.start, s.mask, temperature=1.5, top_k=3, top_p=0.8)
    torch.testing.assert_close(old[s.mask], want[s.mask], rtol=1e-5, atol=1e-5)
    # the reference (here the initial policy) is read on its full distribution
    ref = t.logprobs(t.ref, s, torch.arange(s.mask.shape[0]))
    torch.testing.assert_close(ref[s.mask], full[s.mask], rtol=1e-4, atol=1e-4)
    row, _ = t.step(1)
    assert all(v == v for v in row.values() if isinstance(v, float))  # no NaN from the cut


@pytest.mark.parametrize("keys,msg", [({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")])
def test_bad_sampler_settings(tmp_path, keys, msg):
    with pytest.raises(config.ConfigError, match=msg):
        build("grpo", None, {**GRPO_FAST, "out": str(tmp_path / "r"), **keys})
