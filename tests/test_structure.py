"""The code's shape, checked: no import circles among pretrain/ modules (imports inside functions
count), and the training loop fits on one screen."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pretrain"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the pretrain modules it imports anywhere in its file (a package import counts as
    importing the package's __init__; ``from pkg import name`` as the submodule when it is one)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
                    # importing a.b.c runs a/__init__ and a/b/__init__ first
                    parent = t.rpartition(".")[0]
                    while parent:
                        if parent in modules and parent != mod and not mod.startswith(parent + "."):
                            graph[mod].add(parent)
                        parent = parent.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_in_pretrain():
    found = cycles(import_graph())
    assert not found, "import circles among pretrain modules:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_training_loop_fits_a_screen_without_closures():
    tree = ast.parse((PACKAGE / "trainer.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    loop = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert loop.end_lineno - loop.lineno + 1 <= 60
    nested = [n for n in ast.walk(loop) if n is not loop and isinstance(n, (ast.FunctionDef, ast.Lambda, ast.ClassDef))]
    assert not nested, [getattr(n, "name", "lambda") for n in nested]


def test_the_readme_layout_names_the_project_as_it_is():
    """Every module and subpackage of pretrain/, and every module of data_tools/ and launch/, appears
    in the README's layout block, and every pretrain file or folder the block names exists."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"[\w/]+\.py|\b\w+/", block))
    present = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    present |= {p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    for sub in PACKAGE.iterdir():  # the modules of each subpackage
        if sub.is_dir() and (sub / "__init__.py").exists():
            present |= {p.name for p in sub.glob("*.py") if p.name != "__init__.py"}
    for top in ("data_tools", "launch"):
        present |= {p.name for p in (ROOT / top).glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert present <= named, sorted(present - named)
    pretrain_part = block.split("pretrain/", 1)[1].split("launch/", 1)[0]
    for name in set(re.findall(r"\b\w+\.py", pretrain_part)) | set(re.findall(r"(?m)^\s+(\w+/)", pretrain_part)):
        found = list(PACKAGE.rglob(name.rstrip("/")))
        assert found, f"README layout names {name}, which pretrain/ does not have"
    for top in ("data_tools", "launch"):
        part = block.split(f"{top}/", 1)[1].split("\n", 3)
        for name in set(re.findall(r"\b\w+\.py", " ".join(part[:3]))):
            assert (ROOT / top / name).is_file() or list(PACKAGE.rglob(name)), f"README layout names {top}/{name}"


def test_tests_import_shared_builders_from_helpers_only():
    offenders = []
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("tests.test_", "tests.conftest")):
                offenders.append(f"{path.name}: from {node.module}")
    assert not offenders, offenders


def test_ci_fails_on_an_unexpected_skip_and_on_a_hung_test(tmp_path):
    """tests/conftest.py under CI=1: a skip without an ALLOWED_SKIPS entry fails the run; pytest-timeout
    (configured in pyproject.toml) fails a test that hangs."""
    import os
    import subprocess
    import sys

    (tmp_path / "test_cases.py").write_text(
        "import time, pytest\n"
        "def test_skips():\n    pytest.skip('something is not installed')\n"
        "@pytest.mark.timeout(2)\ndef test_hangs():\n    time.sleep(60)\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
           "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT)]

    def run(test: str, ci: bool):
        env = {k: v for k, v in os.environ.items() if k != "CI"}
        if ci:
            env["CI"] = "1"
        return subprocess.run(cmd + [f"{tmp_path / 'test_cases.py'}::{test}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    assert run("test_skips", ci=False).returncode == 0
    under_ci = run("test_skips", ci=True)
    assert under_ci.returncode == 1 and "unexpected skips" in under_ci.stdout, under_ci.stdout[-2000:]
    hung = run("test_hangs", ci=False)
    assert hung.returncode != 0 and "Timeout" in hung.stdout + hung.stderr, hung.stdout[-2000:]


def test_the_step_the_loop_and_the_engine_take_few_positional_arguments():
    """No constructor or function of pretrain/trainer.py, step.py or engine.py takes more than five
    positional arguments (self aside): the rest are keywords, named where they are passed."""
    import importlib
    import inspect

    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    offenders = []
    for name in ("pretrain.trainer", "pretrain.step", "pretrain.engine"):
        module = importlib.import_module(name)
        for obj_name, obj in vars(module).items():
            if getattr(obj, "__module__", None) != name:
                continue  # imported from elsewhere
            members = [(obj_name, obj)] if inspect.isfunction(obj) else []
            if inspect.isclass(obj) and not issubclass(obj, BaseException):
                members = [(f"{obj_name}.{n}", f) for n, f in vars(obj).items() if inspect.isfunction(f)]
                members.append((obj_name, obj))  # the constructor, dataclasses' generated one included
            for label, fn in members:
                params = list(inspect.signature(fn).parameters.values())
                count = sum(p.kind in positional and p.name not in ("self", "cls") for p in params)
                if count > 5:
                    offenders.append(f"{label}: {count}")
    assert not offenders, offenders
