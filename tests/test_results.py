"""docs/results.json is the one source of the documented results: every experiment has its entry, every page
shows the table generated from it, and the comparison `rlhf-kernels reproduce` makes catches a number off by
more than its tolerance. (The runs themselves: `make reproduce-quick` in CI, `make reproduce` in full.)"""
import copy
import json

import pytest

from rlhf_kernels.train.experiments import reproduce as rp

RESULTS = json.loads(rp.RESULTS.read_text())


def test_every_recorded_experiment_has_its_seeds_and_versions():
    assert set(RESULTS) <= {e.id for e in rp.EXPERIMENTS}
    quick = {e.id for e in rp.EXPERIMENTS if e.quick}
    assert quick <= set(RESULTS), "CI's `make reproduce-quick` compares with these: they must be recorded"
    for exp in rp.EXPERIMENTS:
        if exp.id not in RESULTS:
            continue  # its page says it is not measured over seeds yet (the generated block)
        e = RESULTS[exp.id]
        assert len(e["seeds"]) >= 3, f"{exp.id}: at least 3 seeds"
        assert {m.key for m in exp.metrics} == set(e["metrics"]), exp.id
        assert all(len(m["values"]) == len(e["seeds"]) for m in e["metrics"].values()), exp.id
        assert e["date"] and e["machine"] and e["versions"]["torch"]


def test_every_page_shows_the_table_generated_from_the_results_file():
    stale = rp.render_pages(RESULTS)
    assert not stale, f"regenerate with `rlhf-kernels reproduce --update` (or fix by hand-free means): {list(stale)}"
    for exp in rp.EXPERIMENTS:
        text = (rp.ROOT / "docs" / exp.page).read_text()
        assert f"<!-- results:{exp.id} -->" in text, f"docs/{exp.page} lacks the results block of {exp.id}"


def test_a_hand_edited_table_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    e = RESULTS["cartpole"]
    page = tmp_path / "docs" / "page.md"
    page.write_text(f"x\n<!-- results:cartpole -->\n{rp.markdown('cartpole', e)}\n<!-- /results:cartpole -->\ny\n")
    assert rp.render_pages({"cartpole": e}, tmp_path) == {}
    page.write_text(page.read_text().replace(f"{e['metrics']['eval_return']['values'][0]:.1f}", "499.9", 1))
    assert rp.render_pages({"cartpole": e}, tmp_path)


def test_compare_flags_a_metric_beyond_its_tolerance_and_counts_claims():
    exp = rp.by_id()["demo"]
    rec = RESULTS["demo"]
    got = {str(s): {k: m["values"][i] for k, m in rec["metrics"].items()} for i, s in enumerate(rec["seeds"])}
    assert all(row[3] for row in rp.compare(exp, rec, got))
    bad = copy.deepcopy(got)
    bad[str(rec["seeds"][-1])]["ppo_gold"] += rec["metrics"]["ppo_gold"]["tol"] * 1.5
    rows = {row[0]: row[3] for row in rp.compare(exp, rec, bad)}
    assert rows == {row[0]: row[0] != "demo: PPO" for row in rp.compare(exp, rec, got)}
    counts = rp.claim_counts(exp, got)
    assert [(c["text"], c["holds"], c["of"]) for c in rec["claims"]] == counts


def test_reproduce_rejects_an_unknown_experiment():
    from rlhf_kernels.train.core.commands import registry
    from rlhf_kernels.train.core.config import ConfigError
    command = registry()["reproduce"]
    with pytest.raises(ConfigError, match="unknown experiment"):
        command.run(command.build(None, {"only": "nonsense"}))
