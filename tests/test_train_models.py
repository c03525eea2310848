"""Model loading checks: a model without an lm_head or with the wrong sizes gets a clear error; the
fused and naive log-prob paths agree."""
import pytest
import torch
from transformers import AutoModel

from rlhf_kernels.train.core import models
from rlhf_kernels.train.tasks import sentiment


def test_model_without_lm_head():
    with pytest.raises(ValueError, match="no lm_head"):
        models.check_lm(AutoModel.from_config(sentiment.model_config("tiny-llama")), len(sentiment.WORDS))


def test_vocab_too_small(tmp_path):
    cfg = sentiment.model_config("tiny-gpt2")
    cfg.vocab_size = 5
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="5 rows but the tokenizer has"):
        models.load_lm(str(tmp_path))


def test_not_a_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        models.load_lm(str(tmp_path))


@pytest.mark.parametrize("arch", models.TINY)
def test_fused_matches_naive(arch):
    torch.manual_seed(0)
    m = models.load_lm(arch)
    ids = torch.randint(3, len(sentiment.WORDS), (3, 9))
    attn = torch.ones_like(ids)
    mask = torch.rand(3, 5) > 0.3
    a, ea = models.token_logprobs(m, ids, attn, 4, mask, temperature=0.7, impl="fused", entropy=True)
    b, eb = models.token_logprobs(m, ids, attn, 4, mask, temperature=0.7, impl="naive", entropy=True)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(ea, eb, atol=1e-5)
    assert (a[~mask] == 0).all()


def test_scalar_model_roundtrip(tmp_path):
    torch.manual_seed(0)
    rm = models.ScalarModel(models.load_lm("tiny-llama"))
    rm.offset.fill_(0.25)
    rm.save(tmp_path / "rm")
    back = models.ScalarModel.load(tmp_path / "rm")
    ids = torch.randint(3, len(sentiment.WORDS), (2, 6))
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    assert torch.equal(rm.score(ids, attn), back.score(ids, attn))
    assert torch.allclose(back.score(ids, attn)[1], back(ids, attn)[1, 3])
