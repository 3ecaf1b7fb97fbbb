"""The layering the code promises: one import package, an engine that knows no stage and imports
nothing above it, and no import cycles anywhere."""
import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS = PYPROJECT["tool"]["setuptools"]["package-dir"]  # recap.X -> folder
ABOVE_ENGINE = ("recap.stages", "recap.trainer", "recap.metadata", "recap.world", "recap.cli", "recap.jobs",
                "recap.models")


def _modules() -> dict[str, Path]:
    """Every module of the recap package, by dotted name, from the package-dir mapping."""
    out = {}
    for pkg, folder in PACKAGE_DIRS.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """recap modules ``name`` imports, at any depth of the file (function-level imports count)."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] == "recap" and t in MODULES)
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_only_one_top_level_package_and_every_folder_is_packaged():
    assert {p.split(".")[0] for p in PYPROJECT["tool"]["setuptools"]["packages"]} == {"recap"}
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    for name, path in MODULES.items():
        if path.name == "__init__.py":
            assert name in listed, f"{path.parent} is a package but pyproject.toml does not install {name}"
    assert "recap.cli:main" in PYPROJECT["project"]["scripts"]["recap"]


def test_the_engine_imports_nothing_above_it():
    bad = {m: sorted(t for t in targets if t.startswith(ABOVE_ENGINE))
           for m, targets in GRAPH.items() if m.startswith("recap.pipeline")}
    assert not {m: t for m, t in bad.items() if t}


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


# Words of the reinforced format itself that stages are also named after: DataCompDR's config.json
# key ``reinforce`` (ml-mobileclip's ``reinforce.image_augmentation``) and the ``syn_source`` label
# of a rewritten text. The format's vocabulary, not the engine knowing a stage.
FORMAT_WORDS = {"pipeline/reinforced/config.py": {"reinforce"}, "pipeline/reinforced/testing.py": {"rewrite"}}


def test_the_engine_names_no_stage_and_no_download_convention():
    stages = [ep.name for ep in __import__("importlib.metadata").metadata.entry_points(group="recap.stages")]
    assert {"download", "basic", "dedup", "balance", "clip", "filter"} <= set(stages)
    forbidden = set(stages) | {"success", "failed_to_download", "failed_to_resize"}
    hits = []
    for name, path in MODULES.items():
        if not name.startswith("recap.pipeline"):
            continue
        for line, value in _code_strings(path):
            words = {value, *(value.split("/")), *(value.split("."))}
            if words & (forbidden - FORMAT_WORDS.get(str(path.relative_to(ROOT)), set())):
                hits.append(f"{path.relative_to(ROOT)}:{line}: {value!r}")
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("module", ["recap.pipeline.steps", "recap.pipeline.runner", "recap.pipeline.inspect"])
def test_stages_do_not_reach_into_the_engine_internals(module):
    """A stage reads its state and carried rows through StageData, never through the step machinery."""
    users = [m for m, targets in GRAPH.items() if m.startswith("recap.stages") and module in targets]
    assert not users
