"""Supervised fine-tuning on demonstrations: token-mean negative log-likelihood of the response
tokens (through rk.linear_logprobs), prompts not trained on."""
from dataclasses import dataclass

import torch

from .._choices import Task
from . import tasks
from .core import lora, models, parallel
from .core.commands import Command
from .core.config import positive, topic
from .core.optim import make_optimizer
from .core.run_config import RunConfig
from .core.runlog import Run, clip_and_step, finish, loop, step_generator
from .decode import rollout
from .tasks.data import demonstration_set


def nll_step(run, step, forward, data, idx, cfg, par=None):
    """Backpropagate the token-mean NLL of rows `idx` of `data` in micro-batches through `forward`
    (a parallel.LMForward, maybe wrapped); return the loss. Under torchrun `idx` is this rank's share
    and the mean is over the job's tokens."""
    par = par or parallel.Single()
    dev = cfg.device
    total = par.sum(data.mask[idx].sum()).clamp(min=1)  # the job's response tokens
    loss_sum = 0.0
    micros = idx.split(cfg.micro_batch_size)
    for i, micro in enumerate(micros):
        par.sync_grads(forward, last=i == len(micros) - 1)
        s = rollout.Samples(data.prompts[micro], data.responses[micro], data.mask[micro], data.has_eos[micro])
        lp = forward(s.ids.to(dev), s.attn.to(dev), s.start, s.mask.to(dev), impl=cfg.logprob_impl)
        loss = -lp.sum() / total
        run.check_finite(step, loss=loss)
        par.scale(loss).backward()
        loss_sum += loss.item()
    return loss_sum, int(data.mask[idx].sum() + data.prompts[idx].numel())


def train(cfg):
    torch.manual_seed(cfg.seed)
    par = parallel.setup(cfg)
    run = Run(cfg, "sft", par)
    task = tasks.get(cfg.task)
    policy = lora.wrap(models.load_lm(cfg.model, cfg.device, len(task.WORDS)), cfg)  # lora_r > 0: adapters only train
    forward = par.wrap_lm(policy)
    sampler = par.sampler(forward, policy)
    data = demonstration_set(cfg.examples, cfg.seed, task)
    opt = make_optimizer([(policy.parameters(), cfg.lr)])
    mine = par.rows(cfg.batch_size)

    def step_fn(step):
        idx = torch.randint(0, cfg.examples, (cfg.batch_size,), generator=step_generator(cfg, step))
        loss, tokens = nll_step(run, step, forward, data, idx[mine], cfg, par)
        metrics = {"loss": par.sum(loss),
                   "grad_norm": clip_and_step(run, step, opt, policy.parameters(), cfg.max_grad_norm)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics.update(rollout.evaluate_cfg(sampler, cfg))
        return metrics, tokens

    loop(run, {"policy": policy}, opt, step_fn)
    par.save(forward, lambda m: models.save_lm(m.lm, run.dir / "model"))
    return finish(run, {"model": str(run.dir / "model"), **rollout.evaluate_cfg(sampler, cfg), **lora.summary(policy)})


model_key = topic("model and data")


@dataclass
class SFTConfig(RunConfig):
    model: str = model_key("tiny-llama", "\"tiny-llama\", \"tiny-gpt2\" (built from a config) or a saved model dir")
    examples: int = model_key(4000, "demonstrations in the training set")
    steps: int = 200
    lr: float = 3e-3
    eval_every: int = 50
    task: Task = model_key("sentiment", "the embedded task; confidence: responses state a confidence (PPO-C/PPO-M)")

    def check(self):
        super().check()
        positive(self, "examples")


COMMAND = Command("train sft", SFTConfig, train, "supervised fine-tuning on the task's demonstrations",
                  print_result=True, data_parallel=True)
