"""The embedded default task: synthetic sentiment continuation. Nothing is downloaded.

A prompt is `<bos> <subject> <subject> :`; a response is a few words then `<eos>`. The gold reward
is the share of positive words in the response, counted against at least `MIN_LEN` words (so a
one-word answer cannot score 1), and 0 for a response with no `<eos>`. SFT demonstrations draw each
word at random from positive, negative and neutral words, so the SFT policy scores in the middle;
raising the reward means shifting probability onto positive words while still ending the sentence.
"""
import torch

SPECIAL = ["<pad>", "<bos>", "<eos>", ":"]
SUBJECTS = ["movie", "book", "song", "meal", "game", "trip", "show", "hotel", "phone", "park", "class", "team"]
POSITIVE = ["great", "fun", "lovely", "bright", "superb", "kind", "warm", "calm"]
NEGATIVE = ["dull", "awful", "cold", "rude", "slow", "bland", "noisy", "sad"]
NEUTRAL = ["very", "quite", "the", "and", "was", "it", "so", "a"]
WORDS = SPECIAL + SUBJECTS + POSITIVE + NEGATIVE + NEUTRAL
PAD, BOS, EOS = 0, 1, 2
MIN_LEN = 4
LENGTHS = (2, 8)          # SFT response lengths in words, inclusive
P_POSITIVE = 0.35         # share of positive words in SFT demonstrations
PROMPT_LEN = 4


def tokenizer(words=WORDS):
    """A word-level `PreTrainedTokenizerFast` over `words` (built by the `tokenizers` library)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def model_config(arch, vocab_size=len(WORDS)):
    """A tiny Transformers config for `arch` ("tiny-llama" or "tiny-gpt2"), dropout off (N+ detail 7)."""
    from transformers import GPT2Config, LlamaConfig
    ids = dict(vocab_size=vocab_size, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    if arch == "tiny-llama":
        return LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, max_position_embeddings=64, attention_dropout=0.0,
                           tie_word_embeddings=False, **ids)
    if arch == "tiny-gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, **ids)
    raise ValueError(f"unknown tiny architecture {arch!r}; expected 'tiny-llama' or 'tiny-gpt2'")


_POS = set(WORDS.index(w) for w in POSITIVE)
_CONTENT = torch.tensor([WORDS.index(w) for w in POSITIVE + NEGATIVE + NEUTRAL])


def prompts(n, generator):
    """[n, PROMPT_LEN] prompt token ids."""
    subj = torch.randint(len(SPECIAL), len(SPECIAL) + len(SUBJECTS), (n, 2), generator=generator)
    return torch.cat([torch.full((n, 1), BOS), subj, torch.full((n, 1), SPECIAL.index(":"))], 1)


def demonstrations(n, generator):
    """[n, LENGTHS[1] + 1] responses (words, <eos>, then <pad>) drawn from the SFT distribution."""
    lo, hi = LENGTHS
    lengths = torch.randint(lo, hi + 1, (n,), generator=generator)
    pos = torch.rand(n, hi, generator=generator) < P_POSITIVE
    pos_words = _CONTENT[torch.randint(0, len(POSITIVE), (n, hi), generator=generator)]
    other = _CONTENT[torch.randint(len(POSITIVE), len(_CONTENT), (n, hi), generator=generator)]
    words = torch.where(pos, pos_words, other)
    out = torch.full((n, hi + 1), PAD)
    idx = torch.arange(hi + 1)
    out[:, :hi] = torch.where(idx[:hi] < lengths[:, None], words, PAD)
    out[torch.arange(n), lengths] = EOS
    return out


def gold_reward(responses):
    """Gold reward in [0, 1] of each row of `responses` [B, R] (token ids; anything after the first
    <eos> is ignored; no <eos> gives 0)."""
    out = []
    for row in responses.tolist():
        if EOS not in row:
            out.append(0.0)
            continue
        words = row[:row.index(EOS)]
        out.append(sum(w in _POS for w in words) / max(len(words), MIN_LEN))
    return torch.tensor(out)


def preference_pairs(n, generator, label_noise=0.0):
    """(prompts, chosen, rejected) for n pairs of SFT-distribution responses, labelled by the gold
    reward (ties redrawn), each label flipped with probability `label_noise`."""
    p, chosen, rejected = [], [], []
    need = n
    while need > 0:
        pr = prompts(2 * need, generator)
        a, b = demonstrations(2 * need, generator), demonstrations(2 * need, generator)
        ga, gb = gold_reward(a), gold_reward(b)
        keep = (ga != gb).nonzero().squeeze(1)[:need]
        a_wins = (ga > gb)[keep]
        flip = torch.rand(len(keep), generator=generator) < label_noise
        a_wins = a_wins ^ flip
        a, b = a[keep], b[keep]
        p.append(pr[keep])
        chosen.append(torch.where(a_wins[:, None], a, b))
        rejected.append(torch.where(a_wins[:, None], b, a))
        need -= len(keep)
    return torch.cat(p), torch.cat(chosen), torch.cat(rejected)


def decode(tokens, tok=None):
    tok = tok or tokenizer()
    return [tok.decode([t for t in row if t != PAD]) for row in tokens.tolist()]


METRICS = ()  # names of the task-specific metrics `metrics` returns


def metrics(responses):
    """Task-specific evaluation metrics beyond the gold reward: none for this task (see confidence.py)."""
    return {}

