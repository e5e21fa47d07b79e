"""The house's import rules (docs/ARCHITECTURE.md's table): imports point one way, recipe/cli stay torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import seq2seq_cli

PACKAGE = Path(seq2seq_cli.__file__).resolve().parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))
ANY = "*"

ARCHITECTURE = Path(__file__).resolve().parent.parent / "docs" / "ARCHITECTURE.md"


def architecture_table() -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, set[str]]]:
    """The import table of docs/ARCHITECTURE.md: (module level, also lazily, anything-except) per room."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    start, end = text.index("<!-- import-table"), text.index("<!-- end import-table -->")
    top: dict[str, set[str]] = {}
    lazy: dict[str, set[str]] = {}
    except_: dict[str, set[str]] = {}

    def names(cell: str) -> set[str]:
        cell = cell.strip()
        return set() if cell in ("", "—", "(none)") else {n.strip() for n in cell.split(",")}

    for line in text[start:end].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        room = cells[0].strip("`")
        assert room not in top and room not in except_, f"{room} appears twice in the table"
        if cells[1].startswith("anything except"):
            except_[room] = names(cells[1].removeprefix("anything except"))
        else:
            top[room], lazy[room] = names(cells[1]), names(cells[2])
    return top, lazy, except_


ALLOWED, LAZY_EXTRA, ANYTHING_EXCEPT = architecture_table()


def package_imports(module: str) -> tuple[set[str], set[str]]:
    """(module-level, inside-functions) imports of sibling modules of seq2seq_cli."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    top: set[str] = set()
    lazy: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                names = [node.module.split(".")[0]]
            elif node.level == 1:  # from . import x, y
                names = [a.name for a in node.names]
            elif node.level == 0 and node.module and node.module.split(".")[0] == "seq2seq_cli":
                parts = node.module.split(".")
                names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
            elif node.level > 1:
                raise AssertionError(f"{module}: relative import beyond the package")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "seq2seq_cli" and len(parts) > 1:
                    names.append(parts[1])
        (lazy if in_function else top).update(names)
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return top, lazy


def test_table_covers_every_module() -> None:
    unknown = set(MODULES) - set(ALLOWED) - set(ANYTHING_EXCEPT)
    assert not unknown, f"add these modules to the import table of docs/ARCHITECTURE.md: {sorted(unknown)}"
    stale = (set(ALLOWED) | set(ANYTHING_EXCEPT)) - set(MODULES)
    assert not stale, f"docs/ARCHITECTURE.md lists rooms that do not exist: {sorted(stale)}"
    assert {"recipe", "model", "data", "search", "train", "translate", "cli"} <= set(MODULES)
    assert len(ALLOWED) > 15 and {"train", "cli"} <= set(ANYTHING_EXCEPT)  # the parser really read the table


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_table_matches_the_code_exactly(module: str) -> None:
    """A listed room's row is what it imports, no more: the document does not keep stale allowances."""
    top, lazy = package_imports(module)
    assert top == ALLOWED[module], f"{module}: module-level imports {sorted(top)} vs table {sorted(ALLOWED[module])}"
    assert lazy - top == LAZY_EXTRA[module], (
        f"{module}: lazy imports {sorted(lazy - top)} vs table {sorted(LAZY_EXTRA[module])}"
    )


def test_training_does_not_import_the_decoding_front_end() -> None:
    top, lazy = package_imports("train")
    assert not (top | lazy) & {"translate", "tune", "textio"}
    assert "search" in top  # validation decodes through the search room directly


@pytest.mark.parametrize("module", MODULES)
def test_allowed_imports(module: str) -> None:
    top, lazy = package_imports(module)
    if module in ANYTHING_EXCEPT:
        bad = (top | lazy) & ANYTHING_EXCEPT[module]
    else:
        bad = (top - ALLOWED[module]) | (lazy - ALLOWED[module] - LAZY_EXTRA.get(module, set()))
    assert not bad, f"{module} must not import {sorted(bad)}"
    assert module not in top | lazy


def test_visitor_sees_lazy_and_aliased_imports() -> None:
    top, lazy = package_imports("train")
    # `from . import distributed` counts as importing the module distributed
    assert {"distributed", "checkpoint", "data", "model", "search"} <= top and "progress" in lazy
    top, lazy = package_imports("translate")
    assert "distributed" in lazy and "distributed" not in top and "checkpoint" in top
    top, lazy = package_imports("cli")
    assert top == {"recipe"} and {"pipeline", "translate"} <= lazy


def test_module_level_import_graph_is_acyclic() -> None:
    graph = {m: package_imports(m)[0] & set(MODULES) for m in MODULES}
    state: dict[str, int] = {}

    def dfs(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                dfs(nxt, path + [node])
        state[node] = 2

    for m in MODULES:
        if m not in state:
            dfs(m, [])


def test_lazy_imports_name_existing_modules() -> None:
    missing = {(m, target) for m in MODULES for target in set.union(*package_imports(m)) if target not in MODULES}
    assert not missing, f"imports of modules that do not exist: {sorted(missing)}"


@pytest.mark.parametrize("module", ["seq2seq_cli.recipe", "seq2seq_cli.cli"])
def test_imports_without_torch(module: str) -> None:
    code = (
        f"import sys, {module}; heavy = sorted(m for m in ('torch', 'sentencepiece', 'sacrebleu') "
        f"if m in sys.modules); assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_torch_check_can_fail() -> None:
    """The subprocess check above really detects torch (guards against a vacuous test)."""
    code = "import sys, seq2seq_cli.model; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "AssertionError" in result.stderr
