"""Supervised fine-tuning on demonstrations: token-mean negative log-likelihood of the response
tokens (through rk.linear_logprobs), prompts not trained on."""
from dataclasses import dataclass

import torch

from .._choices import Task
from . import tasks
from .core import lora, models
from .core.commands import Command
from .core.config import positive, topic
from .core.optim import make_optimizer
from .core.run_config import RunConfig
from .core.runlog import Run, clip_and_step, finish, loop, step_generator
from .decode import rollout
from .tasks.data import demonstration_set


def nll_step(run, step, policy, data, idx, cfg):
    """Backpropagate the token-mean NLL of rows `idx` of `data` in micro-batches; return the loss."""
    dev = cfg.device
    total = data.mask[idx].sum().clamp(min=1)
    loss_sum = 0.0
    for micro in idx.split(cfg.micro_batch_size):
        s = rollout.Samples(data.prompts[micro], data.responses[micro], data.mask[micro], data.has_eos[micro])
        lp = models.token_logprobs(policy, s.ids.to(dev), s.attn.to(dev), s.start, s.mask.to(dev),
                                   impl=cfg.logprob_impl)
        loss = -lp.sum() / total
        run.check_finite(step, loss=loss)
        loss.backward()
        loss_sum += loss.item()
    return loss_sum, int(data.mask[idx].sum() + data.prompts[idx].numel())


def train(cfg):
    run = Run(cfg, "sft")
    torch.manual_seed(cfg.seed)
    task = tasks.get(cfg.task)
    policy = lora.wrap(models.load_lm(cfg.model, cfg.device, len(task.WORDS)), cfg)  # lora_r > 0: adapters only train
    data = demonstration_set(cfg.examples, cfg.seed, task)
    opt = make_optimizer([(policy.parameters(), cfg.lr)])

    def step_fn(step):
        idx = torch.randint(0, cfg.examples, (cfg.batch_size,), generator=step_generator(cfg, step))
        loss, tokens = nll_step(run, step, policy, data, idx, cfg)
        metrics = {"loss": loss, "grad_norm": clip_and_step(run, step, opt, policy.parameters(), cfg.max_grad_norm)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics.update(rollout.evaluate_cfg(policy, cfg))
        return metrics, tokens

    loop(run, {"policy": policy}, opt, step_fn)
    models.save_lm(policy, run.dir / "model")
    return finish(run, {"model": str(run.dir / "model"), **rollout.evaluate_cfg(policy, cfg), **lora.summary(policy)})


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
                  print_result=True)
