"""`rlhf-kernels reproduce`: re-run the documented experiments over several seeds, compare every metric with
the recorded one (docs/results.json) within the tolerance stated beside it, and print claim | got | ok.

docs/results.json is the one source of the documented numbers: each experiment's entry holds the command,
the seeds, every metric per seed (with its tolerance), the comparative claims and on how many seeds each
holds, the date, the machine and the package versions. The tables between `<!-- results:ID -->` and
`<!-- /results:ID -->` in docs/*.md are generated from it (`--update` rewrites both, from the same run),
and tests/test_results.py fails when a page's table differs from the file.

Each seed runs the whole chain the docs describe: `rlhf-kernels demo --seed S` first, then every experiment
from that seed's demo models with the same seed, so a result is what the documented commands produce.
`--quick` runs the subset CI runs (minutes); the full set takes about an hour on two cores.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.commands import Command, registry
from ..core.run_config import run_key
from . import results_table
from .results_table import claim_counts, compare, entry, machine_and_versions, markdown  # noqa: F401

ROOT = Path(__file__).resolve().parents[3]
RESULTS = ROOT / "docs" / "results.json"


@dataclass(frozen=True)
class Metric:
    name: str        # the row label in the docs
    key: str         # its key in the run's metrics
    tol: float       # |got − recorded| allowed, per seed (RL on a tiny task moves with rounding; see docs)
    digits: int = 3


@dataclass(frozen=True)
class Claim:
    text: str
    holds: Callable  # metrics of one seed -> bool


@dataclass(frozen=True)
class Experiment:
    id: str
    page: str                  # the docs page whose table it fills
    command: str               # what a user types (for seed S); {seed} is replaced
    run: Callable              # run(out: Path, seed, demo: Path, progress) -> {key: value}
    metrics: tuple
    claims: tuple = ()
    quick: bool = False        # part of `--quick` (CI)
    needs_demo: bool = True
    note: str = ""             # what the numbers mean, printed under the table


def _cmd(name, progress, **keys):
    command = registry()[name]
    cfg = command.build(None, {k: str(v).lower() if isinstance(v, bool) else str(v)
                               for k, v in {**keys, "progress": progress}.items()})
    return command.run(cfg)


def _summary(out):
    return json.loads((Path(out) / "summary.json").read_text())


# ---- the experiments: each returns flat metrics for one seed ----

def run_demo(out, seed, demo, progress):
    s = _cmd("demo", progress, out=demo, seed=seed)
    m = {f"{k}_gold": s[k]["gold_reward"] for k in ("sft", "ppo", "dpo", "rto", "grpo")}
    m.update({f"{k}_no_eos": s[k]["no_eos"] for k in ("sft", "ppo", "dpo", "rto", "grpo")})
    m["rm_accuracy"] = s["rm"]["eval_accuracy"]
    return m


def run_sft_rm(out, seed, demo, progress):
    sft = _cmd("train sft", progress, out=out / "sft", seed=seed)
    rm = _cmd("train rm", progress, out=out / "rm", model=sft["model"], seed=seed)
    return {"sft_gold": sft["gold_reward"], "rm_accuracy": rm["eval_accuracy"]}


def run_cartpole(out, seed, demo, progress):
    r = _cmd("train cartpole", progress, out=out, seed=seed)
    return {"episode_return": r["episode_return"], "eval_return": r["eval_return"]}


PPO_MAX_ROWS = (("all", {}), ("no_reward_norm", {"reward_norm": "none", "score_clip": 10}),
                ("no_ptx", {"ptx_coef": 0}), ("no_critic_pretrain", {"critic_pretrain_steps": 0}),
                ("epochs4", {"epochs": 4}))


def run_ppo_max(out, seed, demo, progress):
    m = {}
    for name, keys in PPO_MAX_ROWS:
        r = _cmd("train ppo", progress, preset="ppo-max", policy=demo / "sft/model", reward_model=demo / "rm/model",
                 out=out / name, seed=seed, **keys)
        m[name] = r["gold_reward"]
    m["default_ppo"] = json.loads((demo / "ppo/result.json").read_text())["gold_reward"]
    return m


def run_lora(out, seed, demo, progress):
    r = _cmd("train ppo", progress, policy=demo / "sft/model", reward_model=demo / "rm/model", lora_r=8,
             lora_alpha=16, lr=0.005, out=out, seed=seed)
    return {"gold_reward": r["gold_reward"]}


def run_rrhf(out, seed, demo, progress):
    rm = _cmd("train rrhf", progress, policy=demo / "sft/model", reward_model=demo / "rm/model", out=out / "rm",
              seed=seed)
    raw = _cmd("train rrhf", progress, policy=demo / "sft/model", reward_model=demo / "rm/model",
               no_eos_penalty="none", out=out / "rm_no_penalty", seed=seed)
    gold = _cmd("train rrhf", progress, policy=demo / "sft/model", reward_model="gold", out=out / "gold", seed=seed)
    sft = json.loads((demo / "sft/result.json").read_text())["gold_reward"]
    return {"sft": sft, "learned_rm": rm["gold_reward"], "learned_rm_no_eos": rm["no_eos"],
            "no_penalty": raw["gold_reward"], "no_penalty_no_eos": raw["no_eos"], "gold_ranking": gold["gold_reward"]}


def run_overoptimization(out, seed, demo, progress):
    s = _cmd("experiment overoptimization", progress, out=out, seed=seed)
    acc = json.loads((Path(out) / "rms" / "result.json").read_text())["eval_accuracy"]  # one per proxy
    m = {"proxy_accuracy_mean": sum(acc) / len(acc), "proxy_accuracy_min": min(acc)}
    for name, r in s.items():
        m[f"{name}_final"], m[f"{name}_peak"] = r["final_gold"], r["peak_gold"]
        m[f"{name}_drop"] = r["peak_gold"] - r["final_gold"]
    return m


def run_calibration(out, seed, demo, progress):
    s = _cmd("experiment calibration", progress, out=out, seed=seed)
    m = {"rm_accuracy": s["rm"]["eval_accuracy"], "crm_accuracy": s["crm"]["eval_accuracy"]}
    for name in ("ppo", "ppo_c", "ppo_m"):
        for k, v in s[name].items():
            if k != "wall_s" and isinstance(v, (int, float)):
                m[f"{name}_{k}"] = v
    return m


def run_mcts(out, seed, demo, progress):
    _cmd("experiment mcts", progress, out=out, seed=seed, prompts=512, policy=demo / "ppo/model", critic=demo / "ppo/critic",
         reward_model=demo / "rm/model")
    return {name: r["gold_reward"] for name, r in _summary(out)["decodings"].items()}


def run_grpo_variants(out, seed, demo, progress):
    _cmd("experiment grpo_variants", progress, out=out, seed=seed, policy=demo / "sft/model")
    runs = _summary(out)["runs"]
    m = {f"{r['variant']}_{r['correction']}": r["gold_reward"] for r in runs}
    # how far the bf16 sampler is from the fp32 trainer (what TIS corrects): mean k3 over the runs, in 1e-6
    m["mismatch_k3_e6"] = 1e6 * sum(r["mismatch_k3"] for r in runs) / len(runs)
    return m


GRPO_VARIANTS = (("grpo", "GRPO"), ("dr_grpo", "Dr. GRPO"), ("dapo", "DAPO's loss"), ("gspo", "GSPO"),
                 ("cispo", "CISPO"))


# (row label, summary key, tolerance) of the calibration experiment's per-policy statistics
CALIBRATION_STATS = (("ECE", "ece", 0.05), ("corr(ĉ, gold)", "conf_corr", 0.1), ("no conf", "conf_missing", 0.15))


def _gold(*names, tol=0.05):
    return tuple(Metric(label, key, tol) for key, label in names)


def _beats(a, b, margin=0.0):
    return lambda m: m[a] > m[b] + margin


EXPERIMENTS = (
    Experiment("sft_rm", "demo.md", "rlhf-kernels train sft --seed={seed} --out runs/sft && "
               "rlhf-kernels train rm --model=runs/sft/model --seed={seed}",
               run_sft_rm, (Metric("SFT gold reward", "sft_gold", 0.03), Metric("RM held-out accuracy", "rm_accuracy",
                                                                                0.03)),
               quick=True, needs_demo=False),
    Experiment("cartpole", "cartpole.md", "rlhf-kernels train cartpole --seed={seed}", run_cartpole,
               (Metric("episode return (last iteration)", "episode_return", 60.0, 1),
                Metric("greedy evaluation return", "eval_return", 60.0, 1)),
               claims=(Claim("PPO solves CartPole (greedy return ≥ 400)", lambda m: m["eval_return"] >= 400),),
               quick=True, needs_demo=False),
    Experiment("demo", "demo.md", "rlhf-kernels demo --seed={seed}", run_demo,
               _gold(("sft_gold", "SFT"), ("ppo_gold", "PPO"), ("dpo_gold", "DPO"), ("rto_gold", "RTO"),
                     ("grpo_gold", "GRPO")) + (Metric("DPO: share of responses without <eos>", "dpo_no_eos", 0.1),
                                               Metric("RM held-out accuracy", "rm_accuracy", 0.03)),
               claims=(Claim("PPO beats SFT by ≥ 0.2", _beats("ppo_gold", "sft_gold", 0.2)),
                       Claim("RTO beats SFT by ≥ 0.2", _beats("rto_gold", "sft_gold", 0.2)),
                       Claim("GRPO beats SFT by ≥ 0.2", _beats("grpo_gold", "sft_gold", 0.2)),
                       Claim("DPO beats SFT", _beats("dpo_gold", "sft_gold")),
                       Claim("RTO beats PPO", _beats("rto_gold", "ppo_gold"))),
               needs_demo=False, note="mean gold reward of samples at temperature 1 on 512 held-out prompts"),
    Experiment("ppo_max", "ppo-max.md", "rlhf-kernels train ppo --preset ppo-max --policy=runs/demo/sft/model "
               "--reward_model=runs/demo/rm/model --seed={seed} [override]", run_ppo_max,
               _gold(("all", "PPO-max (the preset)"), ("no_reward_norm", "… no reward normalize-and-clip"),
                     ("no_ptx", "… no PPO-ptx"), ("no_critic_pretrain", "… no critic pretraining"),
                     ("epochs4", "… 4 epochs per buffer"), ("default_ppo", "default PPO (the demo's)")),
               claims=(Claim("PPO-max trails the default PPO", lambda m: m["all"] < m["default_ppo"]),
                       Claim("4 epochs per buffer beat one pass", _beats("epochs4", "all"))),
               note="mean gold reward on 128 held-out prompts, the trainers' own evaluation (the default PPO row is "
                    "the demo's PPO model's result.json; the demo table scores it on 512 prompts)"),
    Experiment("lora", "lora.md", "rlhf-kernels train ppo --policy=runs/demo/sft/model --reward_model=runs/demo/rm/model "
               "--lora-r=8 --lora-alpha=16 --lr=0.005 --seed={seed}", run_lora,
               _gold(("gold_reward", "LoRA PPO (r = 8)"))),
    Experiment("rrhf", "rrhf.md", "rlhf-kernels train rrhf --policy=runs/demo/sft/model "
               "--reward_model=runs/demo/rm/model --seed={seed}", run_rrhf,
               _gold(("sft", "SFT (the demo's)"), ("learned_rm", "RRHF ranked by the learned reward model"),
                     ("learned_rm_no_eos", "… its share of responses without <eos>"),
                     ("no_penalty", "RRHF ranked by the learned reward model, --no_eos_penalty=none"),
                     ("no_penalty_no_eos", "… its share of responses without <eos>"),
                     ("gold_ranking", "RRHF ranked by the gold reward (--reward_model=gold)")),
               claims=(Claim("RRHF (learned RM) beats SFT", _beats("learned_rm", "sft")),
                       Claim("RRHF (learned RM) without the no-<eos> penalty beats SFT", _beats("no_penalty", "sft")),
                       Claim("the no-<eos> penalty helps RRHF with the learned RM", _beats("learned_rm", "no_penalty"))),
               note="mean gold reward on 128 held-out prompts"),
    Experiment("overoptimization", "overoptimization.md", "rlhf-kernels experiment overoptimization --seed={seed}",
               run_overoptimization,
               _gold(("single_final", "single RM: final gold"), ("single_peak", "single RM: peak gold"),
                     ("wco_final", "WCO: final gold"), ("wco_peak", "WCO: peak gold"),
                     ("uwo_final", "UWO: final gold"), ("uwo_peak", "UWO: peak gold"), tol=0.08) +
               (Metric("proxy RMs' held-out accuracy: mean", "proxy_accuracy_mean", 0.05),
                Metric("proxy RMs' held-out accuracy: weakest", "proxy_accuracy_min", 0.05)),
               claims=(Claim("the single proxy RM overoptimises (peak − final ≥ 0.05)",
                             lambda m: m["single_drop"] >= 0.05),
                       Claim("UWO ends above the single RM", _beats("uwo_final", "single_final")),
                       Claim("WCO ends above the single RM", _beats("wco_final", "single_final"))),
               needs_demo=False, note="gold reward on 128 held-out prompts, evaluated every 5 PPO iterations (peak: the "
                                      "best evaluation); the three proxies' accuracy against the gold labels"),
    Experiment("calibration", "calibration.md", "rlhf-kernels experiment calibration --seed={seed}",
               run_calibration, (Metric("RM held-out accuracy", "rm_accuracy", 0.05),
                                 Metric("calibrated RM held-out accuracy", "crm_accuracy", 0.05),
                                 Metric("PPO gold reward", "ppo_gold_reward", 0.08),
                                 Metric("PPO-C gold reward", "ppo_c_gold_reward", 0.08),
                                 Metric("PPO-M gold reward", "ppo_m_gold_reward", 0.08)) +
               tuple(Metric(f"{label} {what}", f"{key}_{k}", tol) for what, k, tol in CALIBRATION_STATS
                     for key, label in (("ppo", "PPO"), ("ppo_c", "PPO-C"), ("ppo_m", "PPO-M"))),
               claims=(Claim("PPO-C has a lower ECE than PPO", lambda m: m["ppo_c_ece"] < m["ppo_ece"]),
                       Claim("PPO-M has a lower ECE than PPO", lambda m: m["ppo_m_ece"] < m["ppo_ece"]),
                       Claim("PPO-M's confidence tracks the gold reward more than PPO's (corr)",
                             lambda m: m["ppo_m_conf_corr"] > m["ppo_conf_corr"])),
               needs_demo=False, note="512 held-out prompts; ECE and corr(ĉ, gold) of the stated confidence ĉ, "
                                      "no conf = share of responses without one (docs/calibration.md)"),
    Experiment("mcts", "mcts.md", "rlhf-kernels experiment mcts --prompts=512 --policy=runs/demo/ppo/model "
               "--critic=runs/demo/ppo/critic --reward_model=runs/demo/rm/model --seed={seed}", run_mcts,
               _gold(("greedy", "greedy"), ("sampled", "sampled, temperature 1"),
                     *((f"mcts_S{n}_c{c}", f"MCTS S={n}, c_puct={c}") for c in (8, 2, 1) for n in (10, 30, 50))),
               claims=tuple(Claim(f"MCTS S={n}, c_puct={c} beats greedy", _beats(f"mcts_S{n}_c{c}", "greedy"))
                            for c in (8, 2, 1) for n in (10, 30, 50)) +
               (Claim("MCTS S=10, c_puct=8 (the released code's defaults) beats sampling",
                      _beats("mcts_S10_c8", "sampled")),),
               note="on the PPO policy and critic of that seed's `make demo`"),
    Experiment("grpo_variants", "grpo.md", "rlhf-kernels experiment grpo_variants --policy=runs/demo/sft/model "
               "--seed={seed}", run_grpo_variants,
               _gold(*((f"{v}_{c}", f"{label}{', TIS' if c == 'tis' else ''}") for v, label in GRPO_VARIANTS
                       for c in ("none", "tis")), tol=0.08) +
               (Metric("bf16 sampler vs fp32 trainer: mean k3 mismatch, ×10⁻⁶", "mismatch_k3_e6", 0.5, 2),),
               claims=tuple(Claim(f"TIS helps {label} under bf16 rollouts", _beats(f"{v}_tis", f"{v}_none"))
                            for v, label in GRPO_VARIANTS),
               note="gold reward after the runs, bf16 rollouts, without and with truncated importance sampling"),
)


def by_id():
    return {e.id: e for e in EXPERIMENTS}


def render_pages(results, root=ROOT):
    """{page path: new text} with every results block regenerated (pages whose text would change)."""
    return results_table.render_pages(results, EXPERIMENTS, root)


# ---- the command ----

def run_reproduce(cfg):
    ids = [e.id for e in EXPERIMENTS if (not cfg.quick or e.quick)] if not cfg.only else cfg.only.split(",")
    unknown = [i for i in ids if i not in by_id()]
    if unknown:
        from ..core.config import ConfigError
        raise ConfigError(f"only: unknown experiment(s) {unknown}; known: {', '.join(by_id())}")
    seeds = [int(s) for s in str(cfg.seeds).split(",")]
    results_path = Path(cfg.results)
    recorded = json.loads(results_path.read_text()) if results_path.exists() else {}
    if cfg.render:
        pages = render_pages(recorded, results_path.parent.parent)
        for page, text in pages.items():
            page.write_text(text)
        print(f"regenerated {len(pages)} page(s) from {results_path}")
        return {"rendered": [str(p) for p in pages]}
    out = Path(cfg.out)
    got = {i: {} for i in ids}
    machine, versions = machine_and_versions()
    t0 = time.perf_counter()
    # experiment by experiment (the demo first: the others start from its models), each over every seed; with
    # --update each experiment is recorded as soon as its seeds are done, so a long run keeps what it finished
    for i in sorted(ids, key=lambda i: i != "demo"):
        exp = by_id()[i]
        for seed in seeds:
            demo = out / f"seed{seed}" / "demo"
            if exp.needs_demo and not (demo / "summary.json").exists():
                print(f"== reproduce: demo, seed {seed} ({time.perf_counter() - t0:.0f} s)", flush=True)
                run_demo(None, seed, demo, cfg.progress)
            print(f"== reproduce: {i}, seed {seed} ({time.perf_counter() - t0:.0f} s)", flush=True)
            got[i][str(seed)] = exp.run(out / f"seed{seed}" / i, seed, demo, cfg.progress)
        if cfg.update:
            recorded[i] = entry(exp, got[i], machine, versions)
            recorded = {e.id: recorded[e.id] for e in EXPERIMENTS if e.id in recorded}
            results_path.write_text(json.dumps(recorded, indent=2, ensure_ascii=False) + "\n")
            for page, text in render_pages(recorded, results_path.parent.parent).items():
                page.write_text(text)
            print(f"== reproduce: recorded {i} in {results_path}", flush=True)
    rows = []
    for i in ids:
        rows += compare(by_id()[i], recorded.get(i), got[i])
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'claim':<{width}} | recorded | got | ok |\n|{'-' * (width + 2)}|---|---|---|")
    for label, rec, new, ok in rows:
        print(f"| {label:<{width}} | {rec} | {new} | {'ok' if ok else 'MISMATCH'} |")
    for i in ids:
        for text, k, n in claim_counts(by_id()[i], got[i]):
            print(f"{i}: {text}: {k} of {n} seeds")
    if cfg.update:
        return {"updated": ids}
    bad = [r[0] for r in rows if not r[3]]
    if bad:
        raise SystemExit(f"reproduce: {len(bad)} metric(s) differ from docs/results.json beyond their tolerance: "
                         + "; ".join(bad))
    return {"ok": ids}


@dataclass
class ReproduceConfig:
    out: str = run_key("runs/reproduce", "directory of every seed's runs")
    quick: bool = run_key(False, "only the experiments CI runs (minutes)")
    only: str = run_key("", "comma-separated experiment ids (default: all, or the quick ones with --quick)")
    seeds: str = run_key("0,1,2", "comma-separated seeds")
    update: bool = run_key(False, "record the results in docs/results.json and regenerate the docs tables")
    results: str = run_key(str(RESULTS), "the results file (the docs it renders into are in its folder)")
    render: bool = run_key(False, "only regenerate the docs tables from the results file; run nothing")
    progress: bool = run_key(False, "show the trainers' progress bars")

    def check(self):
        pass


COMMAND = Command("reproduce", ReproduceConfig, run_reproduce,
                  "re-run the documented experiments over seeds and compare with docs/results.json")
