"""Bradley–Terry reward model: a scalar head on a causal LM backbone, read at the last valid token,
trained with −log σ(r_chosen − r_rejected) (N+ reward.py), then offset so that its mean score on
SFT demonstrations is 0 (N+ detail 15)."""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .._choices import CRMLoss, Task
from . import tasks
from .core import models, parallel
from .core.commands import Command
from .core.config import ConfigError, positive, topic
from .core.optim import make_optimizer
from .core.run_config import RunConfig, check_task
from .core.runlog import Run, clip_and_step, finish, loop, step_generator
from .rewards import crm
from .rewards.scoring import accuracy, mean_score, rows
from .tasks.data import demonstration_set, pair_set


def train(cfg):
    if cfg.ensemble > 1:  # k members with different seeds (train_members)
        return train_members(cfg)
    if cfg.calibrated:  # PPO-M's calibrated reward model (docs/algorithms.md §8)
        return crm.train(cfg)
    torch.manual_seed(cfg.seed)
    par = parallel.setup(cfg)
    run = Run(cfg, "rm", par)
    task = tasks.get(cfg.task)
    rm = models.ScalarModel(models.load_lm(cfg.model, cfg.device, len(task.WORDS))).to(cfg.device)
    rm.lm.get_output_embeddings().weight.requires_grad_(False)  # the LM head plays no part in a score
    data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    chosen, rejected = pair_set(cfg.pairs, data_seed, cfg.label_noise, task)
    held_c, held_r = pair_set(256, data_seed + 7, 0.0, task)
    net = par.wrap(rm)
    scorer = par.scorer(net, rm)
    opt = make_optimizer([(rm.parameters(), cfg.lr)])
    mine = par.rows(cfg.batch_size)

    def step_fn(step):
        idx = torch.randint(0, cfg.pairs, (cfg.batch_size,), generator=step_generator(cfg, step))[mine]
        loss_sum, acc = 0.0, 0.0
        micros = idx.split(cfg.micro_batch_size)
        for i, micro in enumerate(micros):
            par.sync_grads(net, last=i == len(micros) - 1)
            margin = scorer.score(*rows(chosen, micro, cfg.device)) - scorer.score(*rows(rejected, micro, cfg.device))
            loss = -F.logsigmoid(margin).sum() / cfg.batch_size  # the job's batch (this rank holds a share)
            run.check_finite(step, loss=loss)
            par.scale(loss).backward()
            loss_sum += loss.item()
            acc += (margin > 0).float().sum().item() / cfg.batch_size
        sums = par.sum_metrics({"loss": loss_sum, "accuracy": acc})
        metrics = {**sums, "grad_norm": clip_and_step(run, step, opt, rm.parameters(), cfg.max_grad_norm)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics["eval_accuracy"] = accuracy(scorer, held_c, held_r, cfg.device)
        tokens = int(chosen.attn[idx].sum() + rejected.attn[idx].sum())
        return metrics, tokens

    loop(run, {"rm": rm}, opt, step_fn)
    if cfg.normalize:
        rm.offset.zero_()
        rm.offset.fill_(mean_score(scorer, demonstration_set(512, data_seed + 3, task), cfg.device).item())
    par.save(net, lambda m: m.save(run.dir / "model"))
    return finish(run, {"model": str(run.dir / "model"), "eval_accuracy": accuracy(scorer, held_c, held_r, cfg.device),
                        "offset": rm.offset.item()})


def train_members(cfg):
    """`rlhf-kernels train rm --ensemble=k`: k reward-model runs in out/member_i, member i seeded by
    seed + i (head init and batch order), all on the data of data_seed (default: seed). Each member
    is an ordinary RM run (resumable, with its metrics, checkpoint and curves)."""
    data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    out = Path(cfg.out)
    results = []
    for i in range(cfg.ensemble):
        member = dataclasses.replace(cfg, ensemble=1, seed=cfg.seed + i, data_seed=data_seed,
                                     out=str(out / f"member_{i}"))
        if cfg.progress:
            print(f"== reward model {i + 1}/{cfg.ensemble} (seed {member.seed}) -> {member.out}", flush=True)
        results.append(train(member))
    result = {"model": str(out), "members": [r["model"] for r in results],
              "eval_accuracy": [r["eval_accuracy"] for r in results]}
    if parallel.setup(cfg).is_main:
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


data_key = topic("model and data")
crm_key = topic("calibrated reward model, PPO-M (docs/algorithms.md §8)")
ensemble_key = topic("reward-model ensembles (docs/algorithms.md §7)")


@dataclass
class RMConfig(RunConfig):
    model: str = data_key("tiny-llama", "backbone init: a saved model dir (the SFT policy) or a tiny arch name")
    pairs: int = data_key(3000, "preference pairs in the training set")
    label_noise: float = data_key(0.0, "probability of flipping a preference label")
    steps: int = 100
    lr: float = 1e-3
    normalize: bool = data_key(True, "N+ detail 15: subtract the mean score on SFT demonstrations")
    task: Task = data_key("sentiment", "the embedded task, or confidence (responses state a confidence)")
    calibrated: bool = crm_key(False, "train with the CRM loss on content ⊕ high/low confidence "
                                      "(needs task=confidence)")
    crm_loss: CRMLoss = crm_key("sigmoid", "sigmoid (source default), combined (+ plain pair), "
                                           "variant_1 (+ (cwh, rwl))")
    crm_low_max: int = crm_key(3, "low confidences are uniform on 0..crm_low_max")
    crm_high_min: int = crm_key(7, "high confidences are uniform on crm_high_min..10")
    ensemble: int = ensemble_key(1, "k > 1 trains out/member_0..k-1 with seeds seed..seed+k-1 on the same data")
    data_seed: Optional[int] = ensemble_key(None, "seed of the preference data of every member; null: seed")

    def check(self):
        super().check()
        positive(self, "pairs", "ensemble")
        if self.tp_head:
            raise ConfigError("tp_head=true with train rm: a reward model has no LM head in its loss; tp_head shards "
                              "the policy's head in sft, dpo, ppo, rto and grpo")
        check_task(self, "calibrated")
        if not 0 <= self.crm_low_max < self.crm_high_min <= 10:
            raise ConfigError(f"need 0 <= crm_low_max < crm_high_min <= 10, got crm_low_max={self.crm_low_max}, "
                              f"crm_high_min={self.crm_high_min}")

    def check_lora(self):
        if self.lora_r:
            raise ConfigError("lora_r: LoRA applies to the policy trainers (sft, ppo, dpo, rto), not rm")
        super().check_lora()


COMMAND = Command("train rm", RMConfig, train, "Bradley-Terry reward model (also calibrated, or an ensemble)",
                  print_result=True, data_parallel=True)
