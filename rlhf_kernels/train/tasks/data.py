"""The data sets every trainer draws from a task: SFT demonstrations and gold-labelled preference
pairs, as rollout.Samples (responses cut after their first <eos>)."""
import torch

from ..decode import rollout
from . import sentiment


def demonstration_set(n, seed, task=sentiment):
    g = torch.Generator().manual_seed(seed)
    prompts = task.prompts(n, g)
    responses, mask, has_eos = rollout.truncate_after_eos(task.demonstrations(n, g))
    return rollout.Samples(prompts, responses, mask, has_eos)


def pair_set(n, seed, label_noise, task=sentiment):
    """(chosen Samples, rejected Samples) of n preference pairs labelled by the gold reward."""
    g = torch.Generator().manual_seed(seed + 1)
    prompts, chosen, rejected = task.preference_pairs(n, g, label_noise)
    out = []
    for resp in (chosen, rejected):
        r, mask, has_eos = rollout.truncate_after_eos(resp)
        out.append(rollout.Samples(prompts, r, mask, has_eos))
    return out
