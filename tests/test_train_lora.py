"""LoRA through peft (rlhf_kernels/train/lora.py): only the adapters train, with the math of
W x + (alpha/r)·B A x; the reference is the policy with its adapters disabled (no second copy);
the LM head gets no gradient (rk.linear_logprobs is asked for none); saving, loading and resuming
work; every policy trainer takes the keys from the CLI in both spellings."""
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_kernels as rk
from rlhf_kernels.train import ppo
from rlhf_kernels.train.cli import main, parse_options
from rlhf_kernels.train.core import config, lora, models
from rlhf_kernels.train.core.commands import build
from rlhf_kernels.train.tasks import sentiment

from train_helpers import FAST, PPO_FAST, interrupt_then_resume, metrics

R, ALPHA = 4, 8.0
LORA = {"lora_r": R, "lora_alpha": ALPHA}
LLAMA_PROJ = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# tiny Llama (hidden 64, MLP 192, 2 layers) with A [r, in] and B [out, r] on the seven projections
LLAMA_LORA_PARAMS = 2 * (4 * (R * 64 + 64 * R) + 2 * (R * 64 + 192 * R) + (R * 192 + 64 * R))


def wrapped(arch="tiny-llama", **keys):
    cfg = build("sft", None, {"model": arch, **LORA, **keys})
    torch.manual_seed(0)
    return lora.wrap(models.load_lm(arch), cfg)


def base_model(arch="tiny-llama", seed=0):
    """The weights a trainer seeded with `seed` starts from."""
    torch.manual_seed(seed)
    return models.load_lm(arch)


def batch(seed=0, B=3, P=4, n=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(sentiment.WORDS), (B, P + n), generator=g)
    mask = torch.rand(B, n, generator=g) > 0.2
    attn = torch.cat([torch.ones(B, P, dtype=torch.long), mask.long()], 1)
    return ids, attn, P, mask


def logprobs(model, b=None):
    ids, attn, P, mask = b or batch()
    with torch.no_grad():
        return models.token_logprobs(model, ids, attn, P, mask)


def adapted_modules(model):
    return {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}


# config and CLI ---------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--lora-r=8", "--lora-alpha=16"], ["--lora_r=8", "--lora_alpha", "16"]])
def test_cli_spellings(argv):
    _, overrides = parse_options(argv)
    for kind in ("sft", "ppo", "dpo"):
        cfg = build(kind, None, overrides)
        assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules) == (8, 16.0, 0.0, "all-linear")
    assert build("ppo", None, {}).lora_r == 0  # off by default


@pytest.mark.parametrize("kind,keys,match", [
    ("ppo", {"lora_r": "-1"}, "lora_r must be >= 0"), ("ppo", {"lora_r": "4", "lora_alpha": "0"}, "lora_alpha must be > 0"),
    ("sft", {"lora_r": "4", "lora_dropout": "1"}, r"lora_dropout must be in \[0, 1\)"),
    ("dpo", {"lora_r": "4", "lora_target_modules": " , "}, "lora_target_modules must be"),
    ("rm", {"lora_r": "4"}, "not rm"), ("ppo", {"lora_r": "2.5"}, "lora_r must be int")])
def test_bad_values(kind, keys, match):
    with pytest.raises(config.ConfigError, match=match):
        build(kind, None, keys)


@pytest.mark.parametrize("targets,match", [("nope_proj", "lora_target_modules='nope_proj' does not fit"),
                                           ("q_proj,lm_head", "adapts the LM head")])
def test_bad_target_modules(targets, match):
    with pytest.raises(config.ConfigError, match=match):
        wrapped(lora_target_modules=targets)


# what trains, and the math ----------------------------------------------------------------------
@pytest.mark.parametrize("arch,targets", [("tiny-llama", LLAMA_PROJ), ("tiny-gpt2", {"c_attn", "c_proj", "c_fc"})])
def test_adapters_only_on_attention_and_mlp(arch, targets):
    m = wrapped(arch)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert adapted_modules(m) == targets
    assert not m.get_output_embeddings().weight.requires_grad
    if arch == "tiny-llama":
        assert lora.summary(m)["lora_trainable_params"] == LLAMA_LORA_PARAMS
    assert adapted_modules(wrapped(arch, lora_target_modules="q_proj, v_proj" if arch == "tiny-llama" else "c_fc")) \
        == ({"q_proj", "v_proj"} if arch == "tiny-llama" else {"c_fc"})
    assert lora.summary(base_model(arch)) == {}


def test_lora_forward_and_merge_match_hand_formula():
    m = wrapped()
    layer = m.get_base_model().model.layers[0].self_attn.q_proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        B.normal_()  # peft starts B at 0; any B checks the scaling
    W = layer.base_layer.weight.double()
    x = torch.randn(5, 64)
    expected = x.double() @ W.T + (ALPHA / R) * (x.double() @ A.double().T) @ B.double().T
    with torch.no_grad():
        assert torch.allclose(layer(x).double(), expected, atol=1e-5)
        merged = lora.merged(m).model.layers[0].self_attn.q_proj
        assert isinstance(merged, torch.nn.Linear)
        assert torch.allclose(merged.weight.double(), W + (ALPHA / R) * B.double() @ A.double(), atol=1e-6)
    assert layer.lora_A["default"].weight is A  # merging worked on a copy


def test_dropout_acts_in_gradient_forwards_only():
    m = wrapped(lora_dropout=0.5)
    layer = m.get_base_model().model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        x = torch.randn(4, 64)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        full = layer.base_layer(x) + (ALPHA / R) * x @ A.T @ B.T
        assert torch.allclose(layer(x), full, atol=1e-5) and torch.equal(layer(x), layer(x))
    torch.manual_seed(1)
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, full, atol=1e-3) and not torch.equal(a, b)
    assert isinstance(wrapped().get_base_model().model.layers[0].mlp.up_proj.lora_dropout["default"], torch.nn.Identity)


class OpCalls(TorchDispatchMode):
    """Records the rlhf_kernels ops dispatched (forward and backward) with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "rlhf_kernels" in str(func):
            self.calls.append((str(func), args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", models.TINY)
def test_lm_head_gets_no_gradient(arch):
    m = wrapped(arch)
    ids, attn, P, mask = batch()
    with OpCalls() as rec:
        lp = models.token_logprobs(m, ids, attn, P, mask)
        lp.sum().backward()
    head = m.get_output_embeddings()
    assert head.weight.grad is None
    grads = [p.grad for n, p in m.named_parameters() if "lora_B" in n]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in m.named_parameters() if "lora_" not in n)
    if rk.available_backends()["cpu"] == "available":  # the fused op's backward is told not to form dW
        bwd = [args for name, args in rec.calls if "linear_logprobs_bwd" in name]
        assert len(bwd) == 1
        need_hidden, need_weight = bwd[0][10], bwd[0][11]
        assert need_hidden is True and need_weight is False


# the trainers -----------------------------------------------------------------------------------
def ppo_cfg(tmp_path, name="run", **keys):
    return build("ppo", None, {**PPO_FAST, **LORA, "lr": 1e-2, "out": str(tmp_path / name), **keys})


def test_ppo_reference_saving_and_resume(tmp_path, monkeypatch):
    cfg = ppo_cfg(tmp_path, "straight")
    base = base_model(seed=cfg.seed)
    before = logprobs(base)
    trainer = ppo.PPO(cfg)
    ref, policy = trainer.ref, trainer.policy
    assert isinstance(ref, lora.AdaptersOff) and ref.policy is policy and list(ref.parameters()) == []
    assert torch.equal(logprobs(ref), before) and torch.equal(logprobs(policy), before)  # B = 0 at the start
    # the optimizer holds the adapters and the critic, nothing else; the critic is a separate network
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    adapters = {id(p) for n, p in policy.named_parameters() if ".lora_" in n}
    critic = {id(p) for p in trainer.critic.parameters() if p.requires_grad}
    assert in_opt == adapters | critic and not adapters & critic
    assert not {p.data_ptr() for p in policy.parameters()} & {p.data_ptr() for p in trainer.critic.parameters()}

    result = trainer.train()
    assert torch.equal(logprobs(ref), before)  # the reference has not moved ...
    assert (logprobs(policy) - before).abs().max() > 1e-3  # ... while the policy has
    assert policy.get_output_embeddings().weight.grad is None
    assert result["lora_trainable_params"] == sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert len(metrics(tmp_path / "straight")) == 2 and (tmp_path / "straight" / "curves.png").stat().st_size > 0

    # the saved model/ is the merged policy, a plain model that load_lm reads; adapter/ is the adapter alone
    saved = models.load_lm(result["model"])
    assert not lora.is_peft(saved)
    assert torch.allclose(logprobs(saved), logprobs(policy), atol=1e-5)
    from peft import PeftModel
    again = PeftModel.from_pretrained(base_model(seed=cfg.seed), str(tmp_path / "straight" / "model" / lora.ADAPTER_DIR))
    assert torch.allclose(logprobs(again), logprobs(policy), atol=1e-6)

    # no second copy: the reference reads the policy's own base weights
    with torch.no_grad():
        policy.get_base_model().model.layers[0].self_attn.v_proj.base_layer.weight.mul_(2.0)
    assert not torch.allclose(logprobs(ref), before, atol=1e-4)

    # resume: a run stopped after step 1 and restarted gives the same metrics and the same model
    def checkpointed_after_step_1():
        ck = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
        assert ck["step"] == 1 and len(metrics(tmp_path / "resumed")) == 1
        assert any(".lora_B." in k for k in ck["models"]["policy"])  # the adapter state is checkpointed

    interrupt_then_resume(monkeypatch, ppo.PPO, 2, lambda: ppo.train(ppo_cfg(tmp_path, "resumed")),
                          between=checkpointed_after_step_1)
    assert metrics(tmp_path / "straight") == metrics(tmp_path / "resumed")
    a, b = (models.load_lm(str(tmp_path / d / "model")).state_dict() for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="different settings.*lora_r"):  # LoRA and full runs do not mix
        ppo.train(ppo_cfg(tmp_path, "resumed", steps=3, lora_r=0))


def test_cli_sft_dpo_rto_with_lora(tmp_path):
    small = {**FAST, "steps": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 3e-2}
    opts = [f"--{k}={v}" for k, v in small.items()]
    assert main(["train", "sft", *opts, "--examples=16", "--lora-r=4", "--lora-alpha=8", "--out", str(tmp_path / "sft")]) == 0
    sft = tmp_path / "sft" / "model"
    result = json.loads((tmp_path / "sft" / "result.json").read_text())
    assert result["lora_trainable_params"] == LLAMA_LORA_PARAMS
    # only the adapted projections changed: everything else of the merged model is the seed-0 base
    base, tuned = base_model().state_dict(), models.load_lm(str(sft)).state_dict()
    for k in base:
        assert torch.equal(base[k], tuned[k]) == (k.rsplit(".", 2)[-2] not in LLAMA_PROJ), k
    assert main(["train", "dpo", *opts, f"--policy={sft}", "--pairs=16", "--lora_r=4", "--out", str(tmp_path / "dpo")]) == 0
    rto = {**PPO_FAST, "steps": 1, "policy": sft, "dpo_model": tmp_path / "dpo" / "model", "lora-r": 4}
    assert main(["train", "rto", *[f"--{k}={v}" for k, v in rto.items()], "--out", str(tmp_path / "rto")]) == 0
    for stage, steps in (("sft", 2), ("dpo", 2), ("rto", 1)):
        d = tmp_path / stage
        assert [r["step"] for r in metrics(d)] == list(range(1, steps + 1)) and (d / "checkpoint.pt").exists()
        assert (d / "model" / lora.ADAPTER_DIR / "adapter_config.json").exists()
