"""Scoring samples with a reward model: its mean score and its preference accuracy on pairs."""
import torch


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
