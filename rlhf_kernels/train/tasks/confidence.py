"""The confidence variant of the embedded task (`task="confidence"`), for PPO-C and PPO-M
(docs/algorithms.md §8). It is sentiment.py with a verbalised confidence added; the default task is untouched.

- Vocabulary: sentiment.WORDS followed by the confidence tokens conf0 … conf10 (ids from
  len(sentiment.WORDS) on), so every id of the default task keeps its meaning.
- A response is `words … conf_c <eos>`. Its confidence c is the *last* conf token up to the first
  <eos> (the whole response when there is none); a response without one gets c = 5, as the
  source does for a missing "Confidence: c". (The source's regex takes the first match; with one
  confidence per response, as SFT teaches, the two agree.) The stated probability is ĉ = c/10.
- The gold reward is sentiment.gold_reward of the content: every conf token is removed first, so it
  neither counts as a word nor changes the score.
- SFT demonstrations carry a confidence drawn independently of their quality and mostly high
  (probability P_SFT_HIGH uniform on SFT_HIGH_MIN..10, else uniform on 0..10): the SFT policy is
  overconfident and its confidence says nothing about its answer, which is what PPO-C and PPO-M
  have to repair. Preference pairs are the default task's pairs (labelled by the gold reward of
  the content) with such an independent confidence appended to both responses.
- Calibration (`metrics`): the gold reward g ∈ [0, 1] is the target a calibrated confidence
  states, ĉ ≈ g. Logged: `ece`, the expected calibration error over the 11 confidence values,
  Σ_c (n_c/N)·|c/10 − mean g of the responses stating c|; `brier`, mean (ĉ − g)²; `confidence`,
  mean ĉ; `conf_corr`, the Pearson correlation of ĉ and g (0 when either is constant: does the
  confidence tell good answers from bad ones?); `conf_missing`, the share without a conf token.
"""
import torch

from . import sentiment

CONFIDENCES = [f"conf{c}" for c in range(11)]
WORDS = sentiment.WORDS + CONFIDENCES
CONF0 = len(sentiment.WORDS)          # id of conf0; conf_c is CONF0 + c
MISSING = 5                       # confidence of a response that states none (the source's default)
PAD, BOS, EOS = sentiment.PAD, sentiment.BOS, sentiment.EOS
MIN_LEN, LENGTHS, PROMPT_LEN = sentiment.MIN_LEN, sentiment.LENGTHS, sentiment.PROMPT_LEN
P_SFT_HIGH = 0.8                  # share of SFT demonstrations with a high confidence ...
SFT_HIGH_MIN = 7                  # ... uniform on SFT_HIGH_MIN..10 (the rest uniform on 0..10)

prompts = sentiment.prompts


def model_config(arch, vocab_size=len(WORDS)):
    return sentiment.model_config(arch, vocab_size)


def tokenizer():
    return sentiment.tokenizer(WORDS)


def decode(tokens, tok=None):
    return sentiment.decode(tokens, tok or tokenizer())


def is_confidence(tokens):
    return (tokens >= CONF0) & (tokens <= CONF0 + 10)


def confidence(responses):
    """(c [B] long in 0..10, stated [B] bool): the last conf token up to the first <eos> of each row."""
    is_eos = responses == EOS
    upto_eos = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    conf = is_confidence(responses) & upto_eos
    pos = torch.arange(responses.shape[1], device=responses.device).expand_as(responses)
    last = torch.where(conf, pos, torch.full_like(pos, -1)).amax(1)
    c = responses.gather(1, last.clamp(min=0)[:, None]).squeeze(1) - CONF0
    stated = last >= 0
    return torch.where(stated, c, torch.full_like(c, MISSING)), stated


def strip_confidence(responses):
    """`responses` with every conf token removed: later tokens move left, <pad> fills the end."""
    drop = is_confidence(responses)
    order = torch.argsort(drop.int(), dim=1, stable=True)  # kept tokens first, in their order
    return responses.gather(1, order).masked_fill(drop.gather(1, order), PAD)


def with_confidence(responses, c):
    """Insert conf_{c[i]} before the first <eos> of row i (one column longer); every row needs an <eos>."""
    is_eos = responses == EOS
    if not is_eos.any(1).all():
        raise ValueError("with_confidence: every response needs an <eos> to put the confidence before")
    end = is_eos.int().argmax(1)
    rows = torch.arange(len(responses))
    out = torch.nn.functional.pad(responses, (0, 1), value=PAD)
    out[rows, end] = CONF0 + c
    out[rows, end + 1] = EOS
    return out


def sft_confidence(n, generator):
    """[n] confidences of SFT demonstrations, independent of anything else: mostly high."""
    high = torch.rand(n, generator=generator) < P_SFT_HIGH
    hi = torch.randint(SFT_HIGH_MIN, 11, (n,), generator=generator)
    anyc = torch.randint(0, 11, (n,), generator=generator)
    return torch.where(high, hi, anyc)


def demonstrations(n, generator):
    """[n, LENGTHS[1] + 2] SFT responses: the default task's words, an independent confidence, <eos>."""
    content = sentiment.demonstrations(n, generator)
    return with_confidence(content, sft_confidence(n, generator))


def gold_reward(responses):
    """sentiment.gold_reward of the content, the confidence tokens removed."""
    return sentiment.gold_reward(strip_confidence(responses))


def preference_pairs(n, generator, label_noise=0.0):
    """(prompts, chosen, rejected): sentiment.preference_pairs with an independent SFT confidence on each."""
    return calibrated_pairs(n, generator, label_noise)[:3]


def calibrated_pairs(n, generator, label_noise=0.0, low_max=3, high_min=7):
    """`preference_pairs` (the same draws) and PPO-M's four variants of each pair, in this order:
    prompts, chosen, rejected, chosen⊕high, chosen⊕low, rejected⊕high, rejected⊕low, where a high
    confidence is uniform on high_min..10 and a low one uniform on 0..low_max."""
    p, yc, yr = sentiment.preference_pairs(n, generator, label_noise)
    chosen, rejected = (with_confidence(y, sft_confidence(n, generator)) for y in (yc, yr))

    def draw(lo, hi):
        return torch.randint(lo, hi + 1, (n,), generator=generator)
    return (p, chosen, rejected, with_confidence(yc, draw(high_min, 10)), with_confidence(yc, draw(0, low_max)),
            with_confidence(yr, draw(high_min, 10)), with_confidence(yr, draw(0, low_max)))


def calibration_metrics(c_hat, gold):
    """ECE over the 11 confidence values, Brier-style score, mean confidence and the correlation
    of stated confidence ĉ [N] (multiples of 0.1) with the gold reward [N]."""
    c_hat, gold = c_hat.double(), gold.double()
    bins = (c_hat * 10).round().long()
    ece = 0.0
    for b in bins.unique():
        sel = bins == b
        ece += sel.double().mean() * (c_hat[sel].mean() - gold[sel].mean()).abs()
    cc, gc = c_hat - c_hat.mean(), gold - gold.mean()
    denom = (cc.square().sum() * gc.square().sum()).sqrt()
    corr = (cc * gc).sum() / denom if denom > 0 else torch.zeros((), dtype=torch.float64)
    return {"ece": float(ece), "brier": float((c_hat - gold).square().mean()), "confidence": float(c_hat.mean()),
            "conf_corr": float(corr)}


METRICS = ("ece", "brier", "confidence", "conf_corr", "conf_missing")


def metrics(responses):
    """Calibration of the confidences that `responses` [B, R] state against their gold reward."""
    c, stated = confidence(responses)
    return {**calibration_metrics(c.float() / 10, gold_reward(responses)),
            "conf_missing": float((~stated).float().mean())}
