"""DPO with every rk.dpo_loss type, label smoothing and the reference-free option."""
import pytest
import torch

from rlhf_kernels.train import dpo
from rlhf_kernels.train.core.commands import build

from train_helpers import FAST, metrics


@pytest.mark.parametrize("keys", [{"loss_type": "sigmoid"}, {"loss_type": "sigmoid", "label_smoothing": 0.1},
                                  {"loss_type": "ipo"}, {"loss_type": "hinge"},
                                  {"loss_type": "robust", "label_smoothing": 0.1}, {"reference_free": True}])
def test_dpo_loss_types(tmp_path, keys):
    cfg = build("dpo", None, {**FAST, "steps": 2, "batch_size": 8, "micro_batch_size": 4, "pairs": 16,
                                     "eval_every": 5, **keys, "out": str(tmp_path)})
    dpo.train(cfg)
    rows = metrics(tmp_path)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if not keys.get("reference_free"):
        # the policy starts as its reference, so the first step sees h = 0 exactly
        assert rows[0]["reward_margin"] == 0.0 and rows[0]["chosen_reward"] == 0.0
    assert "gold_reward" in rows[-1]
