"""What every run leaves in its directory: config.json, metrics.jsonl (one line per step), an atomic
resumable checkpoint.pt (tensors only, loaded with weights_only=True), and curves.png; plus the
shared step loop (progress bar, LR annealing, NaN stop, periodic checkpoints)."""
import json
import math
import os
import resource
import time
from pathlib import Path

import torch

from .config import to_dict

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
# settings that may change between a run and its resumption without changing its results
RESUMABLE_CHANGES = {"out", "steps", "progress", "save_every", "device", "dist_timeout_s"}


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or parameter: the run stops and nothing is overwritten."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


def peak_memory_mb(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Run:
    """The run directory. Under torchrun (`par` a parallel.Distributed) rank 0 alone reads and writes it
    and the other ranks get what it read; `par=None` is a single process."""

    def __init__(self, cfg, kind, par=None):
        if not cfg.out:
            raise ValueError("no output directory: pass --out DIR")
        if par is None:
            from .parallel import Single, world_size
            if world_size() > 1:
                from .config import ConfigError
                raise ConfigError(f"{kind} does not run data-parallel: run it without torchrun (or with "
                                  "--nproc_per_node=1); sft, rm, dpo, ppo, rto and grpo do (docs/distributed.md)")
            par = Single()
        self.cfg, self.kind, self.par = cfg, kind, par
        self.dir = Path(cfg.out)
        if par.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint = self.dir / CHECKPOINT
        self.metrics = self.dir / METRICS
        self.last_good = None  # (step, path) of the newest checkpoint written or loaded

    # checkpoints -------------------------------------------------------------------------------
    def load(self):
        """The checkpoint of this directory (dict) or None; truncates metrics.jsonl to its step. Under
        torchrun rank 0 reads it and every rank gets it (or raises its error)."""
        if self.par.world == 1:
            return self._load()
        ck, error = None, None
        if self.par.is_main:
            try:
                ck = self._load()
            except Exception as e:  # every rank raises it, so none waits for the others
                error = e
        ck, error = self.par.broadcast((ck, error))
        if error is not None:
            raise error
        if ck is not None:
            self.last_good = (int(ck["step"]), self.checkpoint)
        return ck

    def _load(self):
        if not self.checkpoint.exists():
            if self.metrics.exists():
                self.metrics.unlink()  # a run that never checkpointed restarts from scratch
            return None
        try:
            ck = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
            step = int(ck["step"])
            saved_cfg = json.loads(ck["config"])
        except Exception as e:
            raise CheckpointError(f"checkpoint {self.checkpoint} cannot be read: {e}") from e
        if ck.get("kind") != self.kind:
            raise CheckpointError(f"checkpoint {self.checkpoint} is from a '{ck.get('kind')}' run, not '{self.kind}'")
        now = to_dict(self.cfg)
        changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved_cfg.get(k) != now[k])
        if changed:
            raise CheckpointError(f"checkpoint {self.checkpoint} was written with different settings "
                                  f"({', '.join(f'{k}={saved_cfg.get(k)!r}' for k in changed)}); "
                                  "use another --out or the same settings")
        self._truncate_metrics(step)
        self.last_good = (step, self.checkpoint)
        return ck

    def save(self, step, state):
        """Write `state` (nested dicts of tensors and plain values) atomically, after checking that
        every floating tensor is finite, so the previous checkpoint survives a bad step or a crash."""
        for name, t in _tensors(state):
            if t.is_floating_point() and not torch.isfinite(t).all():
                self.fail(step, f"non-finite values in {name}")
        if self.par.is_main:
            ck = dict(state, step=step, kind=self.kind, config=json.dumps(to_dict(self.cfg)))
            tmp = self.checkpoint.with_name(CHECKPOINT + ".tmp")
            torch.save(ck, tmp)
            os.replace(tmp, self.checkpoint)
        self.last_good = (step, self.checkpoint)

    def fail(self, step, what):
        where = (f"the last good checkpoint is {self.last_good[1]} (step {self.last_good[0]})"
                 if self.last_good else "no checkpoint was written yet")
        raise TrainingDiverged(f"{self.kind}: {what} at step {step}; stopped without saving; {where}")

    def check_finite(self, step, **values):
        for name, v in values.items():
            v = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
            if not math.isfinite(v):
                self.fail(step, f"non-finite {name} ({v})")

    # metrics -----------------------------------------------------------------------------------
    def log(self, row):
        if not self.par.is_main:
            return
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self):
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def _truncate_metrics(self, step):
        """Keep the rows up to the checkpoint's step; a row cut short by a kill mid-write is dropped."""
        text = self.metrics.read_text() if self.metrics.exists() else ""
        lines = text.split("\n")
        complete, last = lines[:-1], lines[-1]  # `last` is "" unless the final write was cut short
        rows = [json.loads(line) for line in complete if line.strip()]
        try:
            rows += [json.loads(last)] if last.strip() else []
        except json.JSONDecodeError:
            pass
        rows = [r for r in rows if r["step"] <= step]
        tmp = self.metrics.with_name(METRICS + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.metrics)

    def parallel(self):
        """How the run was executed: recorded in config.json and result.json."""
        return {"world_size": self.par.world, "parallel": self.par.mode}

    def write_config(self):
        if self.par.is_main:
            text = json.dumps({**to_dict(self.cfg), **self.parallel()}, indent=2)
            (self.dir / "config.json").write_text(text + "\n")

    def plot(self):
        if not self.par.is_main:
            return
        from .plots import plot_metrics
        plot_metrics(self.read_metrics(), self.dir / "curves.png", title=f"{self.kind}: {self.dir}")


def _tensors(obj, prefix="checkpoint"):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def set_lr(optimizer, cfg, step):
    """Linear annealing to 0 (N+: lrnow = (1 − (update − 1)/num_updates)·lr), or constant."""
    frac = 1.0 - (step - 1) / cfg.steps if cfg.anneal_lr else 1.0
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * frac
    return optimizer.param_groups[0]["lr"]


def clip_and_step(run, step, optimizer, params, max_norm):
    """Grad-norm clipping and an optimizer step, refusing non-finite gradients. The norm is the job's
    (parallel.Distributed.clip_grad_norm: a head sharded with tp_head counts every rank's shard)."""
    norm = run.par.clip_grad_norm(params, max_norm)
    run.check_finite(step, grad_norm=norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def loop(run, modules, optimizer, step_fn, extra_state=None):
    """Run steps 1..cfg.steps (resuming from the checkpoint if there is one): `step_fn(step)` returns
    a dict of metrics and the number of tokens it processed. `modules` (name -> nn.Module) and the
    optimizer are checkpointed, and so is `extra_state` (a dict the step function may update)."""
    from tqdm.auto import tqdm
    cfg = run.cfg
    extra_state = {} if extra_state is None else extra_state
    ck = run.load()
    start = 0
    if ck is not None:
        run.par.load_state(modules, optimizer, ck["models"], ck["optimizer"])
        extra_state.update(ck.get("extra", {}))
        start = int(ck["step"])
    run.write_config()
    bar = tqdm(total=cfg.steps, initial=min(start, cfg.steps), desc=run.kind,
               disable=not (cfg.progress and run.par.is_main), dynamic_ncols=True)
    for step in range(start + 1, cfg.steps + 1):
        lr = set_lr(optimizer, cfg, step)
        t0 = time.perf_counter()
        metrics, tokens = step_fn(step)
        dt = time.perf_counter() - t0
        peak = peak_memory_mb(cfg.device)
        if run.par.world > 1:  # the job's throughput, the largest rank's memory
            tokens, peak = run.par.sum(tokens), run.par.max(peak)
        row = {"step": step, **metrics, "lr": lr, "tokens_per_s": tokens / max(dt, 1e-9),
               "step_time_s": dt, "peak_mem_mb": peak}
        run.log(row)
        bar.update(1)
        bar.set_postfix({k: f"{row[k]:.3g}" for k in ("gold_reward", "loss", "kl") if k in row}, refresh=False)
        if step % cfg.save_every == 0 or step == cfg.steps:
            models, optim = run.par.full_state(modules, optimizer)  # FSDP2: gathered on every rank
            run.save(step, {"models": models, "optimizer": optim, "extra": dict(extra_state)})
    bar.close()
    run.plot()
    return run.read_metrics()


def step_generator(cfg, step, salt=0):
    """A generator seeded by (seed, step): a resumed run draws the same data as an uninterrupted one."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 7_919 + salt)


def finish(run, result):
    """Write result.json (the final evaluation; under torchrun also the world size and parallel mode)
    and return it."""
    if run.par.world > 1:
        result = {**result, **run.parallel()}
    if run.par.is_main:
        (run.dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    run.par.barrier()  # the run directory is complete when any rank returns
    return result
