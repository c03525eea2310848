"""The package's layout rules, read from the source: no import cycle, the trainer is never imported by
the ops, every module stays small, and every command lives in a module named after it.

The import graph includes imports inside functions: the cycles this layout removed (cli ⇄ the
calibration experiment, tasks ⇄ confidence, reward ⇄ crm ⇄ ensemble) all went through such local
imports. A local import only hides a cycle from the interpreter, not from a reader, who still cannot
understand one module without the other; so a cycle counts wherever its imports sit."""
import ast
from pathlib import Path

import rlhf_kernels
from rlhf_kernels.train.core.commands import registry

ROOT = Path(rlhf_kernels.__file__).parent
MAX_LINES = 400


def module_name(path):
    parts = ("rlhf_kernels",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules():
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(name, path, known):
    """The modules of this package that `path` imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from pkg import module`
    # a module's own ancestors are left out: Python initialises them before the module anyway, and
    # `from . import sibling` names the parent package only as the place to look
    return {m for m in found if m in known and m != name and not name.startswith(m + ".")}


def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def find_cycle(edges):
    """One cycle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_graph_sees_relative_and_local_imports():
    g = graph()
    assert "rlhf_kernels.train.tasks.sentiment" in g["rlhf_kernels.train.tasks.confidence"]  # from . import x
    assert "rlhf_kernels.train.core.plots" in g["rlhf_kernels.train.core.runlog"]  # a function-local import
    assert "rlhf_kernels.train.core.runlog" in g["rlhf_kernels.train.sft"]  # from .core.runlog import ...


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_ops_and_kernels_never_import_the_trainer():
    for name, deps in graph().items():
        if not name.startswith("rlhf_kernels.train") and name != "rlhf_kernels.__main__":
            assert not [d for d in deps if d.startswith("rlhf_kernels.train")], name


def test_trainer_modules_stay_small():
    big = {name: n for name, path in modules().items() if name.startswith("rlhf_kernels.train")
           and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_every_command_lives_in_a_module_named_after_it():
    for name, command in registry().items():
        module = command.run.__module__
        words = name.split()
        expected = {"train": "rlhf_kernels.train.", "experiment": "rlhf_kernels.train.experiments."}.get(words[0])
        if expected:
            assert module == expected + words[-1], (name, module)
        else:  # demo, generate, bon: one word, the module's own name
            assert module.rsplit(".", 1)[-1] == name, (name, module)
