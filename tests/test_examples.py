"""The drop-in examples in python/examples run at a small size and do what they claim."""
import importlib.util
import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "python", "examples")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_handwritten_ppo_learns():
    pytest.importorskip("transformers")
    history = load("ppo_handwritten").main(updates=24, batch=32, seed=0)
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last > first + 0.3, history


def test_hf_linear_logprobs_matches_logits_and_saves_memory():
    pytest.importorskip("transformers")
    ex = load("hf_linear_logprobs")
    # vocab 8000 over 64 tokens: the [64, 8000] fp32 logits (2 MiB each) dominate a 2-layer H=32 model
    r = ex.main(vocab=8000, hidden=32, layers=1, batch=2, prompt=4, response=32, seed=0)
    ex.check(r)
    assert r["max_abs_grad_lm_head"] > 0 and r["max_abs_grad_hidden"] > 0, r
    # the logits path holds at least logits, their log-softmax and its gradient at once
    assert r["peak_bytes_logits"] - r["peak_bytes_fused"] > 2 * r["logits_bytes_fp32"], r


def test_hf_linear_logprobs_check_catches_a_wrong_head():
    pytest.importorskip("transformers")
    ex = load("hf_linear_logprobs")
    r = ex.main(vocab=300, hidden=32, layers=1, batch=2, prompt=4, response=8, seed=1, measure_memory=False)
    r["max_abs_diff_logp"] = 1e-3 * r["max_abs_logp"]
    with pytest.raises(AssertionError, match="logp"):
        ex.check(r)


def test_trl_dpo_loss_matches_trl():
    pytest.importorskip("transformers")
    pytest.importorskip("trl")
    r = load("trl_dpo").main(n_pairs=8, batch=4, steps=2, seed=0)
    assert abs(r["loss_rk"] - r["loss_trl"]) <= 1e-5 * abs(r["loss_trl"]), r
    assert r["loss_trl"] > 0
    assert r["max_grad_diff"] <= 1e-5 * r["grad_scale"] and r["grad_scale"] > 0, r
    assert r["max_diff_log_probs"] < 1e-5 and r["max_diff_entropy"] < 1e-5 and r["max_diff_mean_logits"] < 1e-5, r
    assert r["top1_mismatches"] == 0, r
    # training went through our head on both the policy and the reference
    assert all(c > 0 for c in r["rk_head_calls_in_training"]), r


def test_trl_grpo_loss_and_gradients_match_trl():
    pytest.importorskip("transformers")
    pytest.importorskip("trl")
    ex = load("trl_grpo")
    r = ex.main(steps=1, seed=0)
    # rk.group_advantages of TRL's rewards equals TRL's own advantages
    assert r["advantages_max_diff"] <= 1e-6 * r["advantages_scale"] and r["advantages_scale"] > 0, r
    for name in ex.CASES:
        c = r[name]
        # TRL's head and loss arithmetic are fp32: 1e-6 (absolute for losses below 1, where terms of order 1
        # cancel) is their rounding, far below a change of divisor (one empty row of 8), clip bound or KL
        # weighting, which move the loss and the gradients by percents
        for key in ("loss_rk_loss", "loss_rk"):  # rk's loss on TRL's log-probs; rk's head and loss
            assert abs(c[key] - c["loss_trl"]) <= 1e-6 * max(1.0, abs(c["loss_trl"])), (name, c)
        for key in ("grad_diff_rk_loss", "grad_diff_rk"):
            assert c[key] <= 1e-6 * c["grad_scale"] and c["grad_scale"] > 0, (name, c)
        if name == "sapo":  # not expressed by the op: TRL's loss, said so
            assert c["fallback"] == "loss_type='sapo'", c
        else:
            assert c["fallback"] is None and c["clipfrac"] > 0, (name, c)  # rk's loss ran, and the clip bound
    assert len({round(r[n]["loss_trl"], 6) for n in ex.CASES}) == len(ex.CASES)  # the cases differ from each other
    assert all(n > 0 for n in r["rk_head_calls_in_training"]), r  # training ran through rk's head, policy and reference
