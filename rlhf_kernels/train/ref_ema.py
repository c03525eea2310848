"""Reference-model EMA (Xu et al. 2024, "Is DPO Superior to PPO?", docs/algorithms.md §1.12; the
`ref_ema_eta` of their ReaLHF code): θ_ref ← (1 − η)·θ_ref + η·θ_actor over every parameter and
floating buffer. The trainer applies it once per PPO iteration, after that iteration's update,
because ReaLHF runs it as a hook after each actor_train call and one such call trains on a whole
rollout batch (all its minibatches): η then means the same whatever `minibatches` is."""
import torch


def _floating(model):
    return {**{n: p for n, p in model.named_parameters()},
            **{n: b for n, b in model.named_buffers() if b.is_floating_point()}}


def check_compatible(ref, actor):
    """ValueError unless the two models have the same parameter and buffer names and shapes."""
    r, a = _floating(ref), _floating(actor)
    if r.keys() != a.keys() or any(r[k].shape != a[k].shape for k in r):
        diff = sorted(set(r) ^ set(a)) or [k for k in r if r[k].shape != a[k].shape]
        raise ValueError(f"ref_ema needs a reference of the policy's architecture; they differ at {diff[:3]}")


@torch.no_grad()
def ema_update(ref, actor, eta):
    """In place: ref ← (1 − η)·ref + η·actor (lerp, so η = 0 keeps ref and η = 1 copies actor exactly)."""
    a = _floating(actor)
    for name, t in _floating(ref).items():
        t.lerp_(a[name].to(t.dtype), eta)
