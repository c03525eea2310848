"""DPO (docs/algorithms.md §4) with every rk.dpo_loss type: sequence log-probs summed over response
tokens (rk.linear_logprobs), reference log-probs computed once before training, or taken as 0
(`reference_free`)."""
from dataclasses import dataclass

import torch

import rlhf_kernels as rk

from .._choices import DPOLossType
from .core import lora, models, parallel
from .core.commands import Command
from .core.config import positive, topic
from .core.optim import make_optimizer
from .core.run_config import RunConfig, optim_key
from .core.runlog import Run, clip_and_step, finish, loop, step_generator
from .decode import rollout
from .tasks.data import pair_set


def sequence_logprobs(forward, s, rows, cfg):
    """Σ_t log π(y_t | x, y_<t) over each response (temperature 1: DPO scores the model itself), through
    `forward` (a parallel.LMForward, maybe wrapped)."""
    dev = cfg.device
    lp = forward(s.ids[rows].to(dev), s.attn[rows].to(dev), s.start, s.mask[rows].to(dev), impl=cfg.logprob_impl)
    return lp.sum(-1)


@torch.no_grad()
def reference_logprobs(ref, chosen, rejected, cfg, batch=256):
    rows = torch.arange(len(chosen.prompts)).split(batch)
    return (torch.cat([sequence_logprobs(ref, chosen, r, cfg) for r in rows]),
            torch.cat([sequence_logprobs(ref, rejected, r, cfg) for r in rows]))


def train(cfg):
    torch.manual_seed(cfg.seed)
    par = parallel.setup(cfg)
    run = Run(cfg, "dpo", par)
    policy = lora.wrap(models.load_lm(cfg.policy, cfg.device), cfg)  # lora_r > 0: adapters only train
    chosen, rejected = pair_set(cfg.pairs, cfg.seed, cfg.label_noise)
    if cfg.reference_free:
        ref_c = ref_r = torch.zeros(cfg.pairs, device=cfg.device)
    else:  # every rank scores every pair once (each step draws its rows from all of them)
        ref = par.wrap_lm(models.freeze(models.load_reference(cfg.ref, policy, cfg.device)), trainable=False)
        ref_c, ref_r = reference_logprobs(ref, chosen, rejected, cfg)
        del ref
    forward = par.wrap_lm(policy)
    sampler = par.sampler(forward, policy)
    opt = make_optimizer([(policy.parameters(), cfg.lr)])
    mine = par.rows(cfg.batch_size)

    def step_fn(step):
        idx = torch.randint(0, cfg.pairs, (cfg.batch_size,), generator=step_generator(cfg, step))[mine]
        sums = {"loss": 0.0, "reward_accuracy": 0.0, "reward_margin": 0.0, "chosen_reward": 0.0,
                "rejected_reward": 0.0}
        micros = idx.split(cfg.micro_batch_size)
        for i, micro in enumerate(micros):
            par.sync_grads(forward, last=i == len(micros) - 1)
            c, r = sequence_logprobs(forward, chosen, micro, cfg), sequence_logprobs(forward, rejected, micro, cfg)
            losses, cr, rr = rk.dpo_loss(c, r, ref_c[micro], ref_r[micro], beta=cfg.beta, loss_type=cfg.loss_type,
                                         label_smoothing=cfg.label_smoothing)
            loss = losses.sum() / cfg.batch_size  # the job's batch (this rank holds a share of it)
            run.check_finite(step, loss=loss)
            par.scale(loss).backward()
            w = len(micro) / cfg.batch_size
            sums["loss"] += loss.item()
            sums["reward_accuracy"] += (cr > rr).float().mean().item() * w
            sums["reward_margin"] += (cr - rr).mean().item() * w
            sums["chosen_reward"] += cr.mean().item() * w
            sums["rejected_reward"] += rr.mean().item() * w
        sums = par.sum_metrics(sums)
        metrics = {**sums, "grad_norm": clip_and_step(run, step, opt, policy.parameters(), cfg.max_grad_norm)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics.update(rollout.evaluate_cfg(sampler, cfg))
        return metrics, int(chosen.attn[idx].sum() + rejected.attn[idx].sum())

    loop(run, {"policy": policy}, opt, step_fn)
    par.save(forward, lambda m: models.save_lm(m.lm, run.dir / "model"))
    return finish(run, {"model": str(run.dir / "model"), **rollout.evaluate_cfg(sampler, cfg), **lora.summary(policy)})


model_key = topic("model and data")
loss_key = topic("DPO loss")


@dataclass
class DPOConfig(RunConfig):
    policy: str = model_key("tiny-llama", "initial policy (a saved SFT model dir)")
    ref: str = model_key("", "reference policy; \"\": the initial policy")
    pairs: int = model_key(3000, "preference pairs in the training set")
    label_noise: float = model_key(0.0, "probability of flipping a preference label")
    loss_type: DPOLossType = loss_key("sigmoid", "any rk.dpo_loss type")
    beta: float = loss_key(0.1, "β: scale of the implicit reward")
    label_smoothing: float = loss_key(0.0, "ε: assumed label-flip rate (sigmoid/cDPO and robust)")
    reference_free: bool = loss_key(False, "reference log-ratio := 0 (\"uniform reference\")")
    steps: int = optim_key(60, "optimizer steps; longer runs drift off the data (more responses without <eos>)")
    lr: float = 1e-3
    eval_every: int = 10

    def check(self):
        super().check()
        positive(self, "pairs")


COMMAND = Command("train dpo", DPOConfig, train, "DPO on gold-labelled preference pairs (every rk.dpo_loss type)",
                  print_result=True, data_parallel=True)
