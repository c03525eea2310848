"""What tests/test_train_distributed.py runs under torchrun: a JSON list of trainer command lines
(argv[1]), run one after the other in the same process group, each with optional test hooks:
  crash_at:       every rank raises at the start of this step (a crash after the last checkpoint), and
                  the worker goes on to the next job (typically the same command, which resumes);
  fail_rank/at:   that rank alone raises at the start of that step (the others wait in a collective);
  fixed_rollouts: PPO samples the job's whole batch on every rank with the single-process seed and
                  keeps its rows, so 1 and 2 ranks train on the same rollouts.
"""
import json
import os
import sys

from rlhf_kernels.train import cli, ppo
from rlhf_kernels.train.core import runlog
from rlhf_kernels.train.decode import rollout
from rlhf_kernels.train.tasks import sentiment

RANK = int(os.environ.get("RANK", "0"))


def fail_at(step, ranks, message):
    original = runlog.set_lr

    def set_lr(optimizer, cfg, s):
        if s == step and RANK in ranks:
            raise RuntimeError(message)
        return original(optimizer, cfg, s)

    runlog.set_lr = set_lr
    return original


def fixed_rollouts(self, step, g):
    cfg = self.cfg
    prompts = sentiment.prompts(cfg.batch_size, g).to(cfg.device)
    s = rollout.sample(self.sampler, prompts, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                       seed=cfg.seed * 1_000_003 + step)
    mine = self.par.rows(cfg.batch_size)
    return rollout.Samples(s.prompts[mine], s.responses[mine], s.mask[mine], s.has_eos[mine])


def main():
    status = 0
    for job in json.loads(sys.argv[1]):
        original_set_lr, original_sample = runlog.set_lr, ppo.PPO.sample
        if "crash_at" in job:
            fail_at(job["crash_at"], range(1 << 16), "crash on purpose")
        if "fail_rank" in job:
            fail_at(job["fail_at"], {job["fail_rank"]}, f"rank {job['fail_rank']} failed on purpose")
        if job.get("fixed_rollouts"):
            ppo.PPO.sample = fixed_rollouts
        try:
            status = cli.main(job["argv"]) or status
            if "crash_at" in job:
                raise SystemExit(f"the crash at step {job['crash_at']} did not happen")
        except RuntimeError as e:  # a crash the job asked for: the next job resumes from its checkpoint
            if "crash_at" not in job or "crash on purpose" not in str(e):
                raise
        finally:
            runlog.set_lr, ppo.PPO.sample = original_set_lr, original_sample
    return status


if __name__ == "__main__":
    sys.exit(main())
