"""Every `rlhf-kernels ...` command in a fenced block of README.md and docs/*.md runs as written after
`make demo`: its command exists, every key is known and its value parses (the config is built as the CLI
would), and every input path it reads is written by `make demo` or by a command before it in the docs.
Nothing trains here."""
import shlex
from pathlib import Path

import pytest

from rlhf_kernels.train.cli import parse_options, split_command

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
# what `make demo` (= rlhf-kernels demo --out runs/demo) leaves behind
DEMO_OUTPUTS = {f"runs/demo/{stage}" for stage in ("sft", "rm", "ppo", "dpo", "rto", "grpo")}
# keys that name an output directory rather than an input
OUTPUT_KEYS = {"out", "csv", "plot"}


def fenced_commands(page):
    """(line number, argv) of each rlhf-kernels / python -m rlhf_kernels / torchrun ... -m rlhf_kernels line inside a
    ``` block."""
    inside, found, lines = False, [], []
    for number, line in enumerate(page.read_text().splitlines(), 1):  # a trailing backslash continues a line
        if lines and lines[-1][1].endswith("\\"):
            lines[-1] = (lines[-1][0], lines[-1][1][:-1] + " " + line.strip())
        else:
            lines.append((number, line))
    for number, line in lines:
        if line.startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        if not line.startswith(("rlhf-kernels ", "python -m rlhf_kernels ", "torchrun ")):
            continue
        words = shlex.split(line, comments=True)
        if words[:1] == ["rlhf-kernels"]:
            found.append((number, words[1:]))
        elif words[:3] == ["python", "-m", "rlhf_kernels"]:
            found.append((number, words[3:]))
        elif "rlhf_kernels" in words and words[words.index("rlhf_kernels") - 1] == "-m":  # torchrun ... -m rlhf_kernels
            found.append((number, words[words.index("rlhf_kernels") + 1:]))
    return found


COMMANDS = [(page, number, argv) for page in PAGES for number, argv in fenced_commands(page)]


def test_the_docs_hold_commands():
    assert len(COMMANDS) >= 40, "the extraction found too few commands: did the fences change?"


def _inputs(overrides):
    """The run-directory paths a command reads (values under runs/ of the keys that are not outputs)."""
    return [v for k, v in overrides.items() if k not in OUTPUT_KEYS and v.startswith("runs/")]


def _written(path, produced):
    """True when `path` is a run directory (or its model/critic) that the demo or an earlier command wrote."""
    for run in produced:
        if path == run or path.startswith(run + "/"):
            return True
    return False


@pytest.mark.parametrize("page,number,argv", COMMANDS,
                         ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _ in COMMANDS])
def test_command_parses_and_its_inputs_exist_after_the_demo(page, number, argv, tmp_path, monkeypatch):
    if argv[:1] == ["bench"]:
        pytest.skip("the bench command has its own argparse (tests/test_bench_cli.py)")
    produced = set(DEMO_OUTPUTS)
    for p, n, earlier in COMMANDS:  # commands above this one on the same page ran first
        if p == page and n < number and earlier[:1] != ["bench"]:
            _, before = parse_options(split_command(earlier)[1])
            if "out" in before:
                produced.add(before["out"].rstrip("/"))
    # the run directories as they stand after those commands, for the configs that check their paths
    monkeypatch.chdir(tmp_path)
    for run in produced:
        for sub in ("model", "critic"):
            (tmp_path / run / sub).mkdir(parents=True, exist_ok=True)
    command, rest = split_command(argv)
    file, overrides = parse_options(rest)
    command.build(file, overrides)  # unknown keys and unparsable values raise ConfigError here
    missing = [path for path in _inputs(overrides) if not _written(path.rstrip("/"), produced)]
    assert not missing, (f"{page.relative_to(ROOT)}:{number} reads {missing}, which neither `make demo` nor an "
                         "earlier command on the page writes")


def test_the_check_catches_a_wrong_path_and_an_unknown_key(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\nrlhf-kernels train ppo --policy=runs/sft/model --out runs/x\n"
                    "rlhf-kernels train dpo --nonsense=1\n```\n")
    (number, argv), (_, bad) = fenced_commands(page)
    _, overrides = parse_options(split_command(argv)[1])
    assert not _written(_inputs(overrides)[0], DEMO_OUTPUTS)
    from rlhf_kernels.train.core.config import ConfigError
    command, rest = split_command(bad)
    with pytest.raises(ConfigError):
        command.build(*parse_options(rest))
