"""Data parallelism on torch.distributed for the trainers run under torchrun (docs/distributed.md).

`setup(cfg)` joins the process group torchrun describes in the environment (WORLD_SIZE, RANK,
LOCAL_RANK, MASTER_ADDR/PORT): gloo on CPU, nccl on CUDA, with `cfg.dist_timeout_s` as the timeout of
every collective, so a rank that dies makes the others fail instead of waiting forever. Without
torchrun (WORLD_SIZE unset or 1) it returns the single-process context, whose every method is the
identity: the single-process trainer runs the very same arithmetic it ran before this module existed.

The contract every trainer follows under world size W:
  * each rank takes a contiguous share (`rows`) of every batch, drawn from the same generator on every
    rank, so the union of the shares is the batch a single process would use;
  * each rank's loss is its share of the global loss: local sum / GLOBAL count (`sum` all-reduces the
    counts), times W because DDP and FSDP2 average gradients over ranks (`scale`);
  * statistics that are not sums (whitening, task metrics) are computed on the gathered batch (`gather`);
  * rank 0 alone writes files (`is_main`).
The models whose forward builds a graph are wrapped (`wrap_lm`, `wrap`) with DDP, or with FSDP2
`fully_shard` when `cfg.fsdp`; every use of a causal LM (log-probs and sampling) goes through the
wrapper's forward (LMForward), so the DDP/FSDP hooks see it. With `cfg.tp_head` (DDP only) the LM
head of every wrapped LM (policy, reference) is sharded by vocabulary rows instead of replicated
(tp_head.py): DDP ignores the shard, the gradient norm adds the shards' squares over the ranks
(`clip_grad_norm`), and checkpoints and the saved model hold the whole head, gathered.
"""
import copy
import datetime
import os

import torch

import rlhf_kernels as rk

from . import models, tp_head


class LMForward(torch.nn.Module):
    """A causal LM as the trainer uses it: token log-probs through models.token_logprobs (the one call
    of the LM head: a tensor-parallel head would get its process group there), or sampling
    (`generate=True`). One module whose forward is every use, so DDP and FSDP2 see each of them."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, *args, generate=False, **kwargs):
        if generate:
            with tp_head.whole(self.lm):  # a sharded head is gathered for the whole generate call
                return self.lm.generate(*args, **kwargs)
        return models.token_logprobs(self.lm, *args, **kwargs)


class Sampling:
    """What rollout.sample and rollout.evaluate need of a policy (`generate`, `device`), routed through
    the wrapped forward so a sharded policy is gathered while it samples."""

    def __init__(self, forward, lm):
        self.forward, self.lm = forward, lm

    @property
    def device(self):
        return self.lm.device

    def generate(self, **kwargs):
        return self.forward(generate=True, **kwargs)


class Scoring:
    """What the scoring helpers need of a ScalarModel (`score`), routed through its wrapped forward."""

    def __init__(self, forward):
        self.forward = forward

    def score(self, ids, attn):
        return models.at_last(self.forward(ids, attn), ids, attn)


class Single:
    """World size 1: no process group; every method leaves its argument as it is."""
    world, rank, mode = 1, 0, "none"
    is_main = True

    def rows(self, n, what="batch_size"):
        return slice(0, n)

    def seed(self, base):
        return base

    def scale(self, loss):
        return loss

    def sum(self, x):
        return x

    def max(self, x):
        return x

    def sum_metrics(self, metrics, keep=()):
        return metrics

    def gather(self, t):
        return t

    def broadcast(self, obj):
        return obj

    def masked_whiten(self, x, mask, **kwargs):
        return rk.masked_whiten(x, mask, **kwargs)

    def wrap_lm(self, lm, trainable=True):
        return LMForward(lm)

    def wrap(self, module, trainable=True):
        return module

    def sampler(self, forward, lm):
        return lm

    def scorer(self, forward, model):
        return model

    def full_state(self, modules, optimizer):
        return {n: m.state_dict() for n, m in modules.items()}, optimizer.state_dict()

    def load_state(self, modules, optimizer, model_states, optim_state):
        for name, m in modules.items():
            m.load_state_dict(model_states[name])
        optimizer.load_state_dict(optim_state)

    def barrier(self):
        pass

    def clip_grad_norm(self, params, max_norm):
        """Clip the gradients of `params` to the global norm `max_norm` (None: no clipping); return that norm."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))

    def sync_grads(self, *modules, last):
        pass

    def save(self, module, write):
        """`write(m)` on rank 0 with `m` the whole, unsharded `module` (a collective under FSDP2)."""
        if self.is_main:
            ddp = isinstance(module, torch.nn.parallel.DistributedDataParallel)
            write(module.module if ddp else module)  # DDP's replica is whole


class Distributed(Single):
    """World size > 1 under torchrun: one process per rank in the default process group."""

    def __init__(self, cfg):
        import torch.distributed as dist
        self.dist = dist
        self.world, self.rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.mode = "fsdp" if cfg.fsdp else "ddp"
        self.tp_head = bool(getattr(cfg, "tp_head", False))  # RunConfig.check refuses it with fsdp
        self._shards = set()  # ids of the ShardedHead parameters (tp_head)
        if torch.device(cfg.device).type == "cuda":
            cfg.device = f"cuda:{local}"  # one GPU per process: torchrun's local rank picks it
            torch.cuda.set_device(cfg.device)
        self.device = torch.device(cfg.device)
        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.dist_timeout_s),
                                    device_id=self.device if self.device.type == "cuda" else None)
        self.is_main = self.rank == 0
        self._shells = {}

    def rows(self, n, what="batch_size"):
        """This rank's contiguous share of n rows."""
        if n % self.world:
            from .config import ConfigError
            raise ConfigError(f"{what} ({n}) must be divisible by the world size ({self.world})")
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def seed(self, base):
        """Per-rank sampling seed; rank 0 keeps the single-process one."""
        return base + self.rank * 15_485_863

    def scale(self, loss):
        """DDP and FSDP2 average gradients over ranks; a loss that is this rank's share of the global
        loss is scaled by W so the average is the global loss's gradient."""
        return loss * self.world

    def _reduce(self, x, op):
        if isinstance(x, torch.Tensor):
            t = x.detach().clone()
            self.dist.all_reduce(t, op=op)
            return t
        t = torch.tensor(float(x), dtype=torch.float64, device=self._comm_device())
        self.dist.all_reduce(t, op=op)
        return float(t)

    def sum(self, x):
        return self._reduce(x, self.dist.ReduceOp.SUM)

    def max(self, x):
        return self._reduce(x, self.dist.ReduceOp.MAX)

    def sum_metrics(self, metrics, keep=()):
        """The sum over ranks of every value of `metrics` but those in `keep` (already global), in one
        all-reduce."""
        names = [k for k, v in metrics.items() if k not in keep and v is not None]
        t = torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64, device=self._comm_device())
        self.dist.all_reduce(t)
        return {**metrics, **dict(zip(names, t.tolist()))}

    def gather(self, t):
        """The rank-major concatenation along dim 0 of every rank's `t` (equal shapes): the global batch."""
        src = t.to(torch.uint8) if t.dtype == torch.bool else t.contiguous()  # gloo has no bool
        parts = [torch.empty_like(src) for _ in range(self.world)]
        self.dist.all_gather(parts, src)
        out = torch.cat(parts)
        return out.bool() if t.dtype == torch.bool else out

    def masked_whiten(self, x, mask, **kwargs):
        """rk.masked_whiten with the mean and variance of the job's batch: the op runs on the gathered
        batch (B×T values, the size of the rewards themselves) and each rank keeps its rows, so the
        result is the single-process one bit for bit."""
        full = rk.masked_whiten(self.gather(x), self.gather(mask), **kwargs)
        return full[self.rows(full.shape[0])]

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (pickled)."""
        box = [obj if self.is_main else None]
        self.dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def barrier(self):
        self.dist.barrier()

    def sync_grads(self, *modules, last):
        """Before a micro-batch's forward: DDP all-reduces the accumulated gradients at the backward of
        the minibatch's `last` micro-batch only (what its no_sync() context sets, without re-indenting
        every accumulation loop). FSDP2 reduce-scatters at every backward: its unsharded gradients
        are not kept across micro-batches."""
        from torch.nn.parallel import DistributedDataParallel
        for m in modules:
            if isinstance(m, DistributedDataParallel):
                m.require_backward_grad_sync = last

    def _comm_device(self):
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def clip_grad_norm(self, params, max_norm):
        """With sharded heads the global norm adds every rank's shard: one all-reduce of a float, so every rank
        clips by the same factor and the replicas stay equal."""
        params = [p for p in params if p.grad is not None]
        shards = [p for p in params if id(p) in self._shards]
        if not shards:
            return Single.clip_grad_norm(self, params, max_norm)
        rest = [p.grad for p in params if id(p) not in self._shards]
        sq = torch.nn.utils.get_total_norm([p.grad for p in shards]).double() ** 2
        sq = self.sum(sq.to(self._comm_device())).to(sq.device)
        if rest:
            sq = sq + torch.nn.utils.get_total_norm(rest).double() ** 2
        total = sq.sqrt().to(shards[0].grad.dtype)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm if max_norm is not None else float("inf"), total)
        return total

    # models ------------------------------------------------------------------------------------
    def wrap_lm(self, lm, trainable=True):
        """The LM's forward wrapped; with tp_head its head is first sharded (tp_head.shard): the policy's, and
        that of a frozen reference too, so that both take their log-probs through the same op (the first
        KL of a run is then exactly 0, as on one process)."""
        if self.tp_head:
            head = tp_head.shard(lm)
            self._shards.update(id(p) for p in head.parameters() if p.requires_grad)  # a reference's: frozen
        return self.wrap(LMForward(lm), trainable)

    def wrap(self, module, trainable=True):
        """DDP (trainable modules only: a frozen one needs no gradient sync) or FSDP2 fully_shard,
        each decoder layer a unit of its own, then the root."""
        if self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard
            # the module's structure without its weights, for `save`
            self._shells[id(module)] = copy.deepcopy(module).to("meta")
            for layer in _decoder_layers(module):
                fully_shard(layer)
            fully_shard(module)
            return module
        if not trainable or not any(p.requires_grad for p in module.parameters()):
            return module
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.device.index] if self.device.type == "cuda" else None
        shards = [n for n, p in module.named_parameters() if id(p) in self._shards]
        if shards:  # no average of a sharded head's gradient: each rank's is already the job's for its rows
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, shards)
        return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)  # no buffer to sync

    def sampler(self, forward, lm):
        return Sampling(forward, lm)

    def scorer(self, forward, model):
        return Scoring(forward)

    def save(self, module, write):
        """`write(m)` on rank 0 with `m` the whole model: DDP's replica, or with FSDP2 the gathered full
        state dict loaded into the unsharded copy kept at wrap time (on the meta device until now)."""
        if self.mode != "fsdp":
            with tp_head.whole(module):  # every rank gathers a sharded head; rank 0 writes it
                Single.save(self, module, write)
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.is_main:
                shell = self._shells[id(module)].to_empty(device="cpu")
                shell.load_state_dict(sd)
                write(shell)
        self.barrier()  # no rank goes on (e.g. to load the model) before it is written

    def full_state(self, modules, optimizer):
        """({name: full state dict}, full optimizer state dict), on every rank. DDP keeps full replicas;
        FSDP2's DTensor shards are gathered (torch.distributed.checkpoint.state_dict)."""
        if self.mode != "fsdp":
            return tp_head.whole_heads(*Single.full_state(self, modules, optimizer), modules, optimizer)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        nn_mods, other = _split(modules)
        model_sd, optim_sd = get_state_dict(torch.nn.ModuleDict(nn_mods), optimizer,
                                            options=StateDictOptions(full_state_dict=True))
        states = {n: _prefixed(model_sd, n) for n in nn_mods}
        states.update({n: m.state_dict() for n, m in other.items()})
        return _detach_cpu(states), _detach_cpu(optim_sd)

    def load_state(self, modules, optimizer, model_states, optim_state):
        if self.mode != "fsdp":
            model_states, optim_state = tp_head.head_shards(model_states, optim_state, modules, optimizer)
            return Single.load_state(self, modules, optimizer, model_states, optim_state)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        nn_mods, other = _split(modules)
        model_sd = {f"{n}.{k}": v for n in nn_mods for k, v in model_states[n].items()}
        set_state_dict(torch.nn.ModuleDict(nn_mods), optimizer, model_state_dict=model_sd,
                       optim_state_dict=optim_state, options=StateDictOptions(full_state_dict=True))
        for name, m in other.items():
            m.load_state_dict(model_states[name])


def _decoder_layers(module):
    """The repeated blocks of a Transformers causal LM (`model.layers`, GPT-2's `transformer.h`)."""
    return [m for m in module.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))]


def _split(modules):
    nn_mods = {n: m for n, m in modules.items() if isinstance(m, torch.nn.Module)}
    return nn_mods, {n: m for n, m in modules.items() if n not in nn_mods}


def _prefixed(sd, name):
    p = name + "."
    return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}


def _detach_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _detach_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach_cpu(v) for v in obj)
    return obj


def world_size():
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(cfg):
    """The parallel context of this process: Distributed under torchrun with WORLD_SIZE > 1 (joining the
    process group on first use), else Single."""
    return Single() if world_size() <= 1 else Distributed(cfg)
