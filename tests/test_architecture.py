"""The shape of the code, checked: dvc.yaml's code dependencies are exactly each stage's imports,
stage = command = function name, and nothing in a stage package reaches up into evaluate or the CLI.

A stage's code is the import closure (ast, every import that executes, lazy ones included) of the
module that defines its stage function, plus the data files those modules read beside them and the
package ``__init__`` files that hold code. ``cli.py`` and ``checks.py`` are left out: the CLI only
parses options, checks names and calls the stage function, and the checks change no output, so a
help-text edit must not retrain a model.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SRC = REPO / "src"
PACKAGE = SRC / "hemaflow"
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def _module_file(name: str) -> Path | None:
    path = SRC / Path(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _executed_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Import statements outside ``if TYPE_CHECKING:`` blocks."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(inner) for inner in ast.walk(node)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) and id(n) not in skipped]


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in _executed_imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from package import module`
    return {n for n in names if n.split(".")[0] == "hemaflow" and _module_file(n)}


def _holds_code(init: Path) -> bool:
    body = ast.parse(init.read_text()).body
    return any(not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)) for s in body)


def _data_files(path: Path) -> set[Path]:
    """Files beside a module that it names in a string literal (``classes.yaml``)."""
    strings = {
        n.value
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }
    names = {s for s in strings if len(s) < 100 and "/" not in s and "\n" not in s and not s.endswith(".py")}
    return {path.parent / s for s in names if (path.parent / s).is_file()}


@cache
def closure(module: str) -> frozenset[str]:
    """Every file (relative to the repository) that importing ``module`` executes or reads."""
    seen, todo, files = set(), [module], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        files.add(path)
        files |= _data_files(path)
        todo += sorted(_imported_modules(path))
        parts = name.split(".")
        todo += [".".join(parts[:k]) for k in range(1, len(parts))]  # parent packages run first
    keep = {f for f in files if f.name != "__init__.py" or _holds_code(f)}
    return frozenset(f.relative_to(REPO).as_posix() for f in keep)


def _command_functions() -> dict[str, ast.FunctionDef]:
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    commands = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == "app.command":
                    commands[decorator.args[0].value] = node
    return commands


def stage_entry(stage: str, definition: dict) -> tuple[str, str]:
    """(command, module defining the stage function) of a dvc.yaml stage."""
    body = definition.get("do", definition)
    words = body["cmd"].split()
    assert words[0] == "hemaflow", f"{stage}: cmd must run `hemaflow <command>`"
    command = words[1]
    function = _command_functions()[command]
    base = stage.split("@")[0]
    imports = [n for n in ast.walk(function) if isinstance(n, ast.ImportFrom) and n.module.startswith("hemaflow.")]
    found = [n.module for n in imports for alias in n.names if base.startswith(alias.name)]
    assert found, f"{stage}: `hemaflow {command}` calls no stage function named like the stage"
    return command, found[0]


STAGES = sorted(DVC["stages"])


@pytest.mark.parametrize("stage", STAGES)
def test_stage_command_and_function_share_the_stage_name(stage):
    command, module = stage_entry(stage, DVC["stages"][stage])
    assert stage.startswith(command.replace("-", "_")), f"stage {stage} runs `hemaflow {command}`"
    assert module.split(".")[1] in ("data", "detect", "translate", "classify", "evaluate")


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_lists_exactly_the_code_each_stage_runs(stage):
    definition = DVC["stages"][stage]
    body = definition.get("do", definition)
    _, module = stage_entry(stage, definition)
    listed = {d for d in body["deps"] if d.startswith("src/")}
    assert all(Path(REPO / d).is_file() for d in listed), f"{stage}: dvc.yaml lists folders or missing files"
    expected = set(closure(module))
    assert not listed - expected, f"{stage}: listed but not imported: {sorted(listed - expected)}"
    assert not expected - listed, f"{stage}: imported but not listed: {sorted(expected - listed)}"


def test_a_stage_package_never_imports_evaluate_or_the_cli():
    for path in PACKAGE.rglob("*.py"):
        package = path.relative_to(PACKAGE).parts[0]
        if package in ("evaluate", "cli.py", "predict.py", "__main__.py"):
            continue
        imported = _imported_modules(path)
        assert not {m for m in imported if m.startswith(("hemaflow.evaluate", "hemaflow.cli", "hemaflow.predict"))}, (
            path
        )


def test_classic_translations_do_not_wait_for_the_translator():
    translate = DVC["stages"]["translate"]["do"]
    assert not any("translator" in d for d in translate["deps"])


def test_the_formatter_decides_the_layout():
    markers = [
        p
        for p in (*SRC.rglob("*.py"), *(REPO / "tests").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py"))
        if "fmt: " + "skip" in p.read_text()
    ]
    assert not markers, f"formatter opt-outs in {markers}"
