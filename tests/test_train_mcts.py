"""PPO-MCTS decoding (mcts.py, docs/algorithms.md §9): PUCT selection, backup and child-Q initialisation
on hand-built trees (numbers computed by hand), the decision temperature, the KV-cache path against
a full re-encode, S=1 equals greedy, `rlhf-kernels generate` and `experiment mcts` end to end."""
import json
import math
from pathlib import Path

import pytest
import torch

from rlhf_kernels.train.cli import main
from rlhf_kernels.train.core import models
from rlhf_kernels.train.core.commands import build
from rlhf_kernels.train.decode import generate, mcts
from rlhf_kernels.train.tasks import sentiment

# the KV-cache path must stay on the cache API transformers supports (a deprecation is a FutureWarning)
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")

PAD, EOS = sentiment.PAD, sentiment.EOS


def cfg_(**keys):
    return build("generate", overrides={"policy": "p", "critic": "c", "mcts": True, "progress": False, **keys})


def node(tree, n, value, priors, tokens, terminal=False, klpen=None):
    priors = torch.tensor([priors], dtype=torch.float64)
    tree.set_node(torch.tensor([0]), n, torch.tensor([value]), torch.tensor([tokens]), priors,
                  torch.zeros_like(priors) if klpen is None else torch.tensor([klpen], dtype=torch.float64),
                  torch.tensor([terminal]))


def grow(tree, n, value, priors, tokens, c_puct=8.0, terminal=False, klpen=None, **backup):
    """One simulation by hand: select, create node n with the given evaluation, back it up."""
    parent, slot, leaf, path, length = tree.select(c_puct)
    assert leaf.item() == -1
    node(tree, n, value, priors, tokens, terminal, klpen)
    tree.attach(torch.tensor([0]), parent, slot, n)
    tree.backup(torch.tensor([n]), torch.tensor([False]), **backup)
    return parent.item(), slot.item(), path[0, :length.item()].tolist()


def test_puct_selection_and_backup_by_hand():
    t = mcts.Tree(1, 4, 3)
    node(t, 0, 0.5, [0.5, 0.3, 0.2], [10, 11, 12])
    assert t.q[0, 0].tolist() == [0.5, 0.5, 0.5]  # children start at the parent's V
    # PUCT at the root, N(s)=1: 0.5 + 8·P → [4.5, 2.9, 2.1]
    assert torch.allclose(t.puct(torch.tensor([0]), 8.0), torch.tensor([[4.5, 2.9, 2.1]], dtype=torch.float64))
    assert grow(t, 1, 0.1, [0.6, 0.4, 0.0], [20, 21, 22]) == (0, 0, [10])
    # Q(0,0) ← V(1) = 0.1; V(0) = (0.5 + 1·0.1) / 2 = 0.3; N(0) = 2
    assert t.q[0, 0].tolist() == pytest.approx([0.1, 0.5, 0.5])
    assert (t.value[0, 0].item(), t.visits[0, 0].item(), t.n[0, 0].tolist()) == (pytest.approx(0.3), 2, [1, 0, 0])
    # now 0.1 + 8·0.5·√2/2 = 2.93, 0.5 + 8·0.3·√2 = 3.89, 0.5 + 8·0.2·√2 = 2.76 → slot 1
    r2 = math.sqrt(2)
    want = [0.1 + 8 * 0.5 * r2 / 2, 0.5 + 8 * 0.3 * r2, 0.5 + 8 * 0.2 * r2]
    assert t.puct(torch.tensor([0]), 8.0)[0].tolist() == pytest.approx(want)
    assert grow(t, 2, 0.9, [1.0, 0.0, 0.0], [30, 31, 32]) == (0, 1, [11])
    assert t.value[0, 0].item() == pytest.approx((0.5 + 0.1 + 0.9) / 3)
    # root: 0.1 + 8·0.5·√3/2 = 3.56 beats 0.9 + 8·0.3·√3/2 = 2.98 and 0.5 + 8·0.2·√3 = 3.27, so the
    # descent enters node 1 (N=1): 0.1 + 8·0.6 wins there → expand (1, slot 0), path [10, 20]
    assert grow(t, 3, 0.7, [1.0, 0.0, 0.0], [40, 41, 42]) == (1, 0, [10, 20])
    # Q(1,0) = 0.7, V(1) = (0.1 + 0.7)/2 = 0.4, N(1) = 2; Q(0,0) = V(1) = 0.4, N(0,0) = 2;
    # V(0) = (0.5 + 2·0.4 + 1·0.9) / 4 = 0.55, N(0) = 4
    assert t.q[0, 1, 0].item() == pytest.approx(0.7)
    assert (t.value[0, 1].item(), t.visits[0, 1].item()) == (pytest.approx(0.4), 2)
    assert t.q[0, 0, :2].tolist() == pytest.approx([0.4, 0.9])
    assert t.n[0, 0].tolist() == [2, 1, 0]
    assert (t.value[0, 0].item(), t.visits[0, 0].item()) == (pytest.approx(0.55), 4)
    assert t.parent[0, :4].tolist() == [-1, 0, 0, 1] and t.child[0, 1].tolist() == [3, -1, -1]


def test_backup_with_kl_penalty_and_gamma():
    t = mcts.Tree(1, 3, 2)
    node(t, 0, 1.0, [0.7, 0.3], [10, 11], klpen=[-0.2, 0.05])
    grow(t, 1, 0.5, [0.9, 0.1], [20, 21], klpen=[-0.1, 0.0], kl_coef=0.1, gamma=0.9)
    # Q(0,0) = γ·V(1) + klpen(0,0) = 0.45 − 0.2 = 0.25; V(0) = (1 + 0.25) / 2
    assert t.q[0, 0, 0].item() == pytest.approx(0.25)
    assert t.value[0, 0].item() == pytest.approx(0.625)
    # 0.25 + 8·0.7·√2/2 = 4.21 vs 1.0 + 8·0.3·√2 = 4.39 → slot 1 (a new child of the root)
    grow(t, 2, 2.0, [1.0, 0.0], [30, 31], kl_coef=0.1, gamma=0.9)
    assert t.q[0, 0].tolist() == pytest.approx([0.25, 0.9 * 2.0 + 0.05])
    assert t.value[0, 0].item() == pytest.approx((1 + 0.25 + 1.85) / 3)


def test_terminal_node_is_revisited_not_expanded():
    t = mcts.Tree(1, 3, 2)
    node(t, 0, 0.0, [0.9, 0.1], [EOS, 11])
    grow(t, 1, 1.0, [0.5, 0.5], [20, 21], terminal=True)  # <eos> child with value 1 (e.g. the RM)
    parent, slot, leaf, path, length = t.select(8.0)  # 1 + 8·0.9·√2/2 = 6.09 > 0 + 8·0.1·√2 = 1.13
    assert leaf.item() == 1 and path[0, :length.item()].tolist() == [EOS]
    t.backup(leaf, torch.tensor([True]))
    assert t.visits[0, 1].item() == 2 and t.value[0, 1].item() == 1.0  # fixed value, one more visit
    assert t.n[0, 0].tolist() == [2, 0] and t.value[0, 0].item() == pytest.approx(2 / 3)


def test_rows_search_independently():
    """Two rows in one Tree give exactly what each gives alone (lock-step batching changes nothing)."""
    def run(rows):
        t = mcts.Tree(len(rows), 4, 2)
        r = torch.arange(len(rows))
        vals = torch.tensor([[0.0, 1.0, -1.0, 0.5], [0.2, -0.3, 0.8, 0.1]], dtype=torch.float64)[rows]
        pri = torch.tensor([[0.6, 0.4], [0.2, 0.8]], dtype=torch.float64)[rows]
        t.set_node(r, 0, vals[:, 0], torch.tensor([[5, 6]]).expand(len(rows), 2), pri, torch.zeros_like(pri),
                   torch.zeros(len(rows), dtype=torch.bool))
        for n in (1, 2, 3):
            parent, slot, leaf, path, length = t.select(2.0)
            t.set_node(r, n, vals[:, n], torch.tensor([[7, 8]]).expand(len(rows), 2), pri, torch.zeros_like(pri),
                       torch.zeros(len(rows), dtype=torch.bool))
            t.attach(r, parent, slot, n)
            t.backup(torch.full((len(rows),), n), torch.zeros(len(rows), dtype=torch.bool))
        return t.value[:, :4], t.n[:, 0]
    both = run([0, 1])
    for i in (0, 1):
        one = run([i])
        assert torch.equal(both[0][i], one[0][0]) and torch.equal(both[1][i], one[1][0])


def test_decision_temperature_and_distribution():
    cfg = cfg_(td=0.8, max_new_tokens=10)
    assert [mcts.decision_temperature(cfg, t) for t in (0, 5, 9)] == pytest.approx([0.8, 0.4, 0.08])
    assert mcts.decision_temperature(cfg_(td=0.8, anneal_td=False), 9) == 0.8
    counts = torch.tensor([[4, 2, 1, 0]])
    assert mcts.visit_distribution(counts, 0.5)[0].tolist() == pytest.approx([16 / 21, 4 / 21, 1 / 21, 0])
    assert mcts.visit_distribution(counts, 1.0)[0].tolist() == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0])
    # top-p 0.8 keeps the smallest prefix reaching 0.8: 16/21 = 0.76 is short, so two entries
    assert mcts.visit_distribution(counts, 0.5, top_p=0.8)[0].tolist() == pytest.approx([0.8, 0.2, 0, 0])
    sharp = mcts.visit_distribution(torch.tensor([[50, 49]]), 1e-3)  # N^1000 would overflow
    r = (49 / 50) ** 1000
    assert sharp[0].tolist() == pytest.approx([1 / (1 + r), r / (1 + r)], rel=1e-9)
    assert mcts.decide(torch.tensor([[3, 5, 5, 1]]), cfg, 0).item() == 1  # argmax, ties → higher prior
    g = torch.Generator().manual_seed(0)
    picks = [mcts.decide(torch.tensor([[3, 1]]), cfg_(do_sample=True, td=1.0), 0, g).item() for _ in range(400)]
    assert 0.65 < picks.count(0) / 400 < 0.85  # π = [3/4, 1/4]


def tiny_models(arch, seed=0):
    torch.manual_seed(seed)
    policy = models.load_lm(arch)
    with torch.no_grad():  # spread the logits so that argmax decisions are far from ties
        policy.get_output_embeddings().weight.mul_(20)
    critic = models.ScalarModel(models.load_lm(arch))
    critic.offset.fill_(0.25)
    return policy, critic


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_kv_cache_path_equals_full_reencode(arch):
    policy, critic = tiny_models(arch)
    prompts = sentiment.prompts(3, torch.Generator().manual_seed(1))
    decided = torch.tensor([[20, 21], [22, 23], [24, 2]])
    paths = torch.tensor([[30, PAD, PAD], [31, 32, 33], [34, 35, PAD]])
    lengths = torch.tensor([1, 3, 2])

    def full(ids):
        attn = torch.ones_like(ids)
        return policy(input_ids=ids, attention_mask=attn).logits[:, -1].float(), critic(ids, attn)[:, -1]

    with torch.no_grad():
        for model, idx in ((policy, 0), (critic, 1)):
            p = mcts.Prefix(model)
            got = p.start(prompts)
            assert torch.allclose(got, full(prompts)[idx], atol=1e-5)
            for j in range(decided.shape[1]):
                got = p.advance(decided[:, j])
                assert torch.allclose(got, full(torch.cat([prompts, decided[:, :j + 1]], 1))[idx], atol=1e-5)
            root = torch.cat([prompts, decided], 1)
            for _ in range(2):  # the cache is cropped back: expanding twice gives the same values
                got = p.expand(paths, lengths)
                want = torch.stack([full(torch.cat([root[b], paths[b, :lengths[b]]])[None])[idx][0] for b in range(3)])
                assert torch.allclose(got, want, atol=1e-5)
                assert p.cache.get_seq_length() == root.shape[1]
            p.keep(torch.tensor([0, 2]))
            assert torch.allclose(p.advance(torch.tensor([9, 9])),
                                  full(torch.cat([root[[0, 2]], torch.tensor([[9], [9]])], 1))[idx], atol=1e-5)


def test_priors_and_values_of_new_nodes():
    logits = torch.tensor([[4.0, 0.5, 0.0, -1.0]])
    ref = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    cfg = cfg_(top_k=2, te=2.0, kl_coef=0.5, ref="r")
    tokens, priors, klpen, value = mcts.node_stats(cfg, logits, torch.tensor([0.3]), ref_logits=ref)
    p = torch.softmax(logits.double() / 2, -1)[0]
    assert tokens.tolist() == [[0, 1]] and priors[0].tolist() == pytest.approx(p[:2].tolist())  # not renormalised
    assert klpen[0].tolist() == pytest.approx((-0.5 * (p[:2].log() - math.log(0.25))).tolist())
    _, _, klpen, _ = mcts.node_stats(cfg_(top_k=2, te=2.0, kl_coef=0.5, ref="r", klpen="probdiff", clamp_kl=True),
                                     logits, torch.tensor([0.3]), ref_logits=ref)
    assert klpen[0].tolist() == pytest.approx([-0.5 * (p[0].item() - 0.25), 0.0])  # p[1] < 0.25: clamped
    # terminal values: <eos> → gain·RM + bias; out of tokens without <eos> → no_eos_value; else V
    cfg = cfg_(reward_gain=2.0, reward_bias=0.1)
    v = torch.tensor([0.3, 0.3, 0.3, 0.3])
    is_eos, trunc = torch.tensor([True, True, False, False]), torch.tensor([False, True, True, False])
    _, _, _, value = mcts.node_stats(cfg, logits.expand(4, 4), v, is_eos, trunc, rm_value=torch.tensor([0.5] * 4))
    assert value.tolist() == pytest.approx([1.1, 1.1, -1.0, 0.3])
    _, _, _, value = mcts.node_stats(cfg_(no_eos_value=None), logits.expand(4, 4), v, is_eos, trunc)
    assert value.tolist() == pytest.approx([0.3] * 4)


@pytest.mark.parametrize("top_k", [1, 10])
def test_one_simulation_is_greedy(top_k):
    policy, critic = tiny_models("tiny-llama", seed=3)
    prompts = sentiment.prompts(12, torch.Generator().manual_seed(2))
    cfg = cfg_(simulations=1, top_k=top_k, max_new_tokens=6)
    out = mcts.generate(policy, critic, prompts, cfg)
    assert torch.equal(out, generate.greedy(policy, prompts, 6))
    assert (out == EOS).any()  # the check covers rows that stop early


def test_search_tree_invariants():
    """On a real search: every unvisited child keeps Q = its node's own V (child-Q initialisation),
    N(s) = 1 + Σ N(s,a), V(s) is the visit-weighted average, and the root saw every simulation."""
    policy, critic = tiny_models("tiny-llama", seed=4)
    cfg = cfg_(simulations=12, top_k=4, c_puct=1.0, max_new_tokens=5)
    prompts = sentiment.prompts(5, torch.Generator().manual_seed(3))
    models_ = {"policy": mcts.Prefix(policy), "critic": mcts.Prefix(critic)}
    with torch.no_grad():
        root = {k: m.start(prompts) for k, m in models_.items()}
        t = mcts.search(models_, root, 2, cfg)
    used = t.visits > 0
    assert (t.n[:, 0].sum(-1) == 12).all()
    inner = used & ~t.terminal
    assert torch.equal(t.visits[inner], 1 + t.n.sum(-1)[inner])
    avg = (t.v_eval + (t.n * t.q).sum(-1)) / (1 + t.n.sum(-1))
    assert torch.allclose(t.value[inner], avg[inner])
    unvisited = inner[..., None] & (t.n == 0)
    assert torch.equal(t.q[unvisited], t.v_eval[..., None].expand_as(t.q)[unvisited])
    assert used[:, 1:].any(-1).all() and t.value[used].isfinite().all()


def save_tiny(tmp_path):
    policy, critic = tiny_models("tiny-llama", seed=5)
    models.save_lm(policy, tmp_path / "policy")
    critic.save(tmp_path / "critic")
    models.ScalarModel(models.load_lm("tiny-llama")).save(tmp_path / "rm")
    return {k: str(tmp_path / k) for k in ("policy", "critic", "rm")}


def test_generate_cli_end_to_end(tmp_path, capsys):
    d = save_tiny(tmp_path)
    common = ["--policy", d["policy"], "--prompts=6", "--batch_size=4", "--max_new_tokens=5", "--progress=false"]
    out = tmp_path / "mcts.json"
    assert main(["generate", *common, "--mcts", "--critic", d["critic"], "--reward_model", d["rm"],
                 "--simulations=4", "--kl_coef=0.1", "--ref", d["policy"], "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["method"] == "mcts" and res["simulations"] == 4 and len(res["samples"]) == 6
    assert 0 <= res["gold_reward"] <= 1 and res["settings"]["kl_coef"] == 0.1
    assert res["samples"][0]["prompt"].startswith("<bos>")
    printed = json.loads(capsys.readouterr().out)
    assert printed["gold_reward"] == res["gold_reward"] and "samples" not in printed
    for extra, name in (([], "greedy"), (["--do_sample"], "sample")):
        assert main(["generate", *common, *extra, "--out", str(tmp_path / f"{name}.json")]) == 0
        assert json.loads((tmp_path / f"{name}.json").read_text())["method"] == name
    # a one-simulation search is greedy decoding: the CLI agrees with itself
    assert main(["generate", *common, "--mcts", "--critic", d["critic"], "--simulations=1",
                 "--out", str(tmp_path / "s1.json")]) == 0
    s1, greedy = (json.loads((tmp_path / f).read_text())["samples"] for f in ("s1.json", "greedy.json"))
    assert [r["response"] for r in s1] == [r["response"] for r in greedy]


@pytest.mark.parametrize("args,match", [(["--mcts"], "needs critic"), (["--top_p=0"], "top_p"),
                                        (["--simulations=0"], "simulations must be >= 1"),
                                        (["--klpen=kl"], "logratio, probdiff"), (["--sims=3"], "valid keys"),
                                        (["--mcts", "--critic=c", "--kl_coef=0.1"], "needs ref")])
def test_generate_bad_options(args, match, capsys):
    assert main(["generate", "--policy=p", *args]) == 2
    assert match in capsys.readouterr().err


def test_missing_model_is_named(tmp_path, capsys):
    assert main(["generate", "--policy", str(tmp_path / "nope"), "--progress=false"]) == 2
    assert "nope" in capsys.readouterr().err


def test_mcts_experiment_sweep_table_plot_and_reuse(tmp_path, capsys, monkeypatch):
    """`experiment mcts` decodes greedy, sampled and every (S, c_puct), writes table, summary and
    plot, and a rerun with a wider sweep decodes only the new points."""
    from rlhf_kernels.train.experiments import mcts as mcts_experiment
    d = save_tiny(tmp_path)
    out = tmp_path / "exp"
    common = ["--policy", d["policy"], "--critic", d["critic"], "--reward_model", d["rm"], "--prompts=4",
              "--batch_size=4", "--max_new_tokens=4", "--progress=false", "--out", str(out)]
    assert main(["experiment", "mcts", *common, "--sweep_simulations=1,3", "--sweep_c_puct=8"]) == 0
    summary = json.loads((out / "summary.json").read_text())["decodings"]
    assert list(summary) == ["greedy", "sampled", "mcts_S1_c8", "mcts_S3_c8"]
    assert summary["mcts_S3_c8"]["simulations"] == 3 and summary["mcts_S3_c8"]["c_puct"] == 8
    saved = {name: json.loads((out / "decode" / f"{name}.json").read_text()) for name in summary}
    for name, row in summary.items():
        assert saved[name]["gold_reward"] == row["gold_reward"] and len(saved[name]["samples"]) == 4
    # one simulation per token is greedy decoding (test_one_simulation_is_greedy): the same responses
    responses = {name: [r["response"] for r in saved[name]["samples"]] for name in saved}
    assert responses["mcts_S1_c8"] == responses["greedy"] != responses["sampled"]
    assert (out / "table.md").read_text().count("\n| ") == 5 and (out / "mcts.png").stat().st_size > 0
    assert "| MCTS S=3, c_puct=8 |" in capsys.readouterr().out

    decoded = []
    real = mcts_experiment.decode
    monkeypatch.setattr(mcts_experiment, "decode", lambda g: decoded.append(Path(g.out).stem) or real(g))
    assert main(["experiment", "mcts", *common, "--sweep_simulations=1,3", "--sweep_c_puct=8,1"]) == 0
    assert decoded == ["mcts_S1_c1", "mcts_S3_c1"]
    assert len(json.loads((out / "summary.json").read_text())["decodings"]) == 6
    # a changed setting that applies to every decoding invalidates every saved one
    decoded.clear()
    assert main(["experiment", "mcts", *common[:-2], "--out", str(out), "--sweep_simulations=1",
                 "--sweep_c_puct=8", "--top_k=3"]) == 0
    assert decoded == ["greedy", "sampled", "mcts_S1_c8"]


@pytest.mark.parametrize("args,match", [(["--sweep_c_puct=0"], "sweep_c_puct must be a comma-separated list"),
                                        (["--sweep_simulations=a,2"], "sweep_simulations"),
                                        (["--policy=nope"], "make demo")])
def test_mcts_experiment_bad_options(tmp_path, args, match, capsys):
    d = save_tiny(tmp_path)
    common = [f"--policy={d['policy']}", f"--critic={d['critic']}", "--out", str(tmp_path / "x")]
    assert main(["experiment", "mcts", *common, *args]) == 2
    assert match in capsys.readouterr().err
