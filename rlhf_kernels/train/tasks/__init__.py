"""The tasks a trainer's `task` key selects, each a module with one interface (WORDS, prompts,
demonstrations, gold_reward, preference_pairs, model_config, tokenizer, metrics): `sentiment` (the
embedded default) and `confidence` (the same content with a stated confidence); plus the CartPole
environment of `train cartpole` (cartpole.py) and the data sets built from a task (data.py)."""
from ..._choices import Task, values
from . import confidence, sentiment

TASKS = values(Task)


def get(name):
    """The task module for config key `task`."""
    if name == "sentiment":
        return sentiment
    if name == "confidence":
        return confidence
    raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
