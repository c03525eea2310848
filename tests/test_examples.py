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
