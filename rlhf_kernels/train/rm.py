"""Bradley–Terry reward model: a scalar head on a causal LM backbone, read at the last valid token,
trained with −log σ(r_chosen − r_rejected) (N+ reward.py), then offset so that its mean score on
SFT demonstrations is 0 (N+ detail 15)."""
import torch
import torch.nn.functional as F

from . import models, rollout, tasks
from .runlog import Run, clip_and_step, finish, loop, make_optimizer, step_generator
from .sft import demonstration_set


def pair_set(n, seed, label_noise, task=tasks):
    """(chosen Samples, rejected Samples) of n preference pairs labelled by the gold reward."""
    g = torch.Generator().manual_seed(seed + 1)
    prompts, chosen, rejected = task.preference_pairs(n, g, label_noise)
    out = []
    for resp in (chosen, rejected):
        r, mask, has_eos = rollout.truncate_after_eos(resp)
        out.append(rollout.Samples(prompts, r, mask, has_eos))
    return out


def rows(s, idx, device):
    return s.ids[idx].to(device), s.attn[idx].to(device)


@torch.no_grad()
def mean_score(rm, samples, device, batch=256):
    return torch.cat([rm.score(*rows(samples, idx, device)) for idx in torch.arange(len(samples.prompts)).split(batch)]).mean()


@torch.no_grad()
def accuracy(rm, chosen, rejected, device, batch=256):
    hits = [(rm.score(*rows(chosen, idx, device)) > rm.score(*rows(rejected, idx, device))).float()
            for idx in torch.arange(len(chosen.prompts)).split(batch)]
    return torch.cat(hits).mean().item()


def train(cfg):
    if cfg.ensemble > 1:  # k members with different seeds (ensemble.py)
        from .ensemble import train_members
        return train_members(cfg)
    if cfg.calibrated:  # PPO-M's calibrated reward model (ALGORITHMS.md §8)
        from .crm import train as train_crm
        return train_crm(cfg)
    run = Run(cfg, "rm")
    task = tasks.get(cfg.task)
    torch.manual_seed(cfg.seed)
    rm = models.ScalarModel(models.load_lm(cfg.model, cfg.device, len(task.WORDS))).to(cfg.device)
    rm.lm.get_output_embeddings().weight.requires_grad_(False)  # the LM head plays no part in a score
    data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    chosen, rejected = pair_set(cfg.pairs, data_seed, cfg.label_noise, task)
    held_c, held_r = pair_set(256, data_seed + 7, 0.0, task)
    opt = make_optimizer([(rm.parameters(), cfg.lr)])

    def step_fn(step):
        idx = torch.randint(0, cfg.pairs, (cfg.batch_size,), generator=step_generator(cfg, step))
        loss_sum, acc = 0.0, 0.0
        for micro in idx.split(cfg.micro_batch_size):
            margin = rm.score(*rows(chosen, micro, cfg.device)) - rm.score(*rows(rejected, micro, cfg.device))
            loss = -F.logsigmoid(margin).sum() / len(idx)
            run.check_finite(step, loss=loss)
            loss.backward()
            loss_sum += loss.item()
            acc += (margin > 0).float().sum().item() / len(idx)
        metrics = {"loss": loss_sum, "accuracy": acc,
                   "grad_norm": clip_and_step(run, step, opt, rm.parameters(), cfg.max_grad_norm)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics["eval_accuracy"] = accuracy(rm, held_c, held_r, cfg.device)
        tokens = int(chosen.attn[idx].sum() + rejected.attn[idx].sum())
        return metrics, tokens

    loop(run, {"rm": rm}, opt, step_fn)
    if cfg.normalize:
        rm.offset.zero_()
        rm.offset.fill_(mean_score(rm, demonstration_set(512, data_seed + 3, task), cfg.device).item())
    rm.save(run.dir / "model")
    return finish(run, {"model": str(run.dir / "model"), "eval_accuracy": accuracy(rm, held_c, held_r, cfg.device),
                        "offset": rm.offset.item()})
