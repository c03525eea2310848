"""PPO-M's calibrated reward model (docs/algorithms.md §8; the source's crm_trainer.py), run by
`rlhf-kernels train rm --task=confidence --calibrated=true`. Every preference pair (y_c ≻ y_r) of
the confidence task is shown with a high and a low stated confidence (cwh, cwl, rwh, rwl) and the
reward model learns to pay for confidence on the better answer and for doubt on the worse:

    sigmoid:   L = −log σ(r(cwh) − r(cwl)) − log σ(r(rwl) − r(rwh))        (the source's default)
    combined:  L + (−log σ(r(chosen) − r(rejected)))  on the plain pair
    variant_1: L + (−log σ(r(cwh) − r(rwl)))

averaged over pairs. The plain pair is the one the ordinary RM trains on (content with its
independent SFT confidence). The high/low ranges (`crm_high_min`..10, 0..`crm_low_max`, default
7..10 and 0..3) are ours: the source takes them from its dataset, whose ranges are unverified.
(In the source `variant_1` sets no flag and so runs the sigmoid loss; here it is the loss its name
and docs/algorithms.md describe.) `sigmoid` never compares two different answers, so it only teaches
calibration on top of a model that already ranks answers: as in the source (which fine-tunes a
trained RM), `--model` may be a saved reward model, whose head is then trained further. PPO-M is
plain PPO with the resulting model as `reward_model`.
"""
from pathlib import Path

import torch
import torch.nn.functional as F

from ..._choices import CRMLoss, values
from ..core import models
from ..core.optim import make_optimizer
from ..core.runlog import Run, clip_and_step, finish, loop, step_generator
from ..decode import rollout
from ..tasks import confidence
from ..tasks.data import demonstration_set
from .scoring import accuracy, mean_score

VARIANTS = ("chosen", "rejected", "cwh", "cwl", "rwh", "rwl")


def crm_loss(r, kind="sigmoid"):
    """Per-pair CRM loss [B] from the scores r[name] [B] of the VARIANTS of each pair."""
    loss = -F.logsigmoid(r["cwh"] - r["cwl"]) - F.logsigmoid(r["rwl"] - r["rwh"])
    if kind == "combined":
        return loss - F.logsigmoid(r["chosen"] - r["rejected"])
    if kind == "variant_1":
        return loss - F.logsigmoid(r["cwh"] - r["rwl"])
    if kind != "sigmoid":
        raise ValueError(f"crm_loss must be one of {', '.join(values(CRMLoss))}, got {kind!r}")
    return loss


def needed(kind):
    """The variants a loss reads (the plain pair only for `combined`)."""
    return VARIANTS if kind == "combined" else VARIANTS[2:]


def confidence_hits(r):
    """[2B] bool: r(cwh) > r(cwl) and r(rwl) > r(rwh), the source's confidence accuracy."""
    return torch.cat([r["cwh"] > r["cwl"], r["rwl"] > r["rwh"]])


def pair_sets(n, seed, label_noise, cfg):
    """{variant: Samples} of n calibrated pairs (the same content as reward.pair_set with this seed)."""
    g = torch.Generator().manual_seed(seed + 1)
    prompts, *responses = confidence.calibrated_pairs(n, g, label_noise, cfg.crm_low_max, cfg.crm_high_min)
    return {k: rollout.Samples(prompts, *rollout.truncate_after_eos(resp)) for k, resp in zip(VARIANTS, responses)}


def scores(rm, sets, names, idx, device):
    """{name: scores [len(idx)]} of rows idx of each set, in one forward (all sets have one width)."""
    ids = torch.cat([sets[k].ids[idx] for k in names]).to(device)
    attn = torch.cat([sets[k].attn[idx] for k in names]).to(device)
    return dict(zip(names, rm.score(ids, attn).split(len(idx))))


@torch.no_grad()
def confidence_accuracy(rm, sets, device, batch=128):
    idx = torch.arange(len(sets["cwh"].prompts))
    return torch.cat([confidence_hits(scores(rm, sets, VARIANTS[2:], i, device)).float()
                      for i in idx.split(batch)]).mean().item()


def load(spec, device):
    """A saved reward model to train further, or a new scalar head on a causal LM."""
    if Path(spec, models.HEAD_FILE).is_file():
        rm = models.ScalarModel.load(spec, device)
        models.check_lm(rm.lm, len(confidence.WORDS), spec)
        return rm
    return models.ScalarModel(models.load_lm(spec, device, len(confidence.WORDS))).to(device)


def train(cfg):
    run = Run(cfg, "rm")
    torch.manual_seed(cfg.seed)
    rm = load(cfg.model, cfg.device)
    rm.lm.get_output_embeddings().weight.requires_grad_(False)  # the LM head plays no part in a score
    data = pair_sets(cfg.pairs, cfg.seed, cfg.label_noise, cfg)
    held = pair_sets(256, cfg.seed + 7, 0.0, cfg)
    names = needed(cfg.crm_loss)
    opt = make_optimizer([(rm.parameters(), cfg.lr)])

    def step_fn(step):
        idx = torch.randint(0, cfg.pairs, (cfg.batch_size,), generator=step_generator(cfg, step))
        loss_sum, hits = 0.0, 0.0
        for micro in idx.split(cfg.micro_batch_size):
            r = scores(rm, data, names, micro, cfg.device)
            loss = crm_loss(r, cfg.crm_loss).sum() / len(idx)
            run.check_finite(step, loss=loss)
            loss.backward()
            loss_sum += loss.item()
            hits += confidence_hits(r).float().sum().item()
        metrics = {"loss": loss_sum, "confidence_accuracy": hits / (2 * len(idx)),
                   "grad_norm": clip_and_step(run, step, opt, rm.parameters(), cfg.max_grad_norm)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics["eval_accuracy"] = accuracy(rm, held["chosen"], held["rejected"], cfg.device)
            metrics["eval_confidence_accuracy"] = confidence_accuracy(rm, held, cfg.device)
        return metrics, int(sum(data[k].attn[idx].sum() for k in names))

    loop(run, {"rm": rm}, opt, step_fn)
    if cfg.normalize:
        rm.offset.zero_()
        rm.offset.fill_(mean_score(rm, demonstration_set(512, cfg.seed + 3, confidence), cfg.device).item())
    rm.save(run.dir / "model")
    return finish(run, {"model": str(run.dir / "model"),
                        "eval_accuracy": accuracy(rm, held["chosen"], held["rejected"], cfg.device),
                        "eval_confidence_accuracy": confidence_accuracy(rm, held, cfg.device),
                        "offset": rm.offset.item()})
