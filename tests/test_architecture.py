"""The package layout: no import circles, and every module cites the method spec where it exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ipg_sae", "sae_training")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at module level or inside functions."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule `pkg.sub` when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "ipg_sae.attribution.engine" in graph["ipg_sae.attribution.run"]  # `from .engine import ...`
    assert "ipg_sae.distributed" in graph["ipg_sae.attribution.run"]  # `from .. import distributed`
    assert "sae_training.report" in graph["ipg_sae.cli"]  # imported inside a function
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    cycle = _cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_spec_citations_point_at_real_files():
    cited = re.compile(r"``([\w./-]*ipg-method\.md)``")
    for name, path in _modules().items():
        for ref in cited.findall(path.read_text(encoding="utf-8")):
            target = (REPO / ref).resolve()
            assert target.is_relative_to(REPO) and target.is_file(), f"{name} cites {ref}, which is not in the repo"


def test_readme_and_docs_links_point_at_real_files():
    """Every relative link and image in README.md and docs/ (the study's plots among them) resolves."""
    link = re.compile(r"!?\[[^\]]*\]\(([^)\s#]+)(?:#[^)]*)?\)")
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    checked = 0
    for page in pages:
        for ref in link.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", ref):  # http:, https:, mailto:
                continue
            target = (page.parent / ref).resolve()
            assert target.exists(), f"{page.relative_to(REPO)} links to {ref}, which is not in the repo"
            checked += 1
    assert checked >= 5, "the link pattern found almost no links: check the regex"


def test_no_module_is_over_700_lines():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 700}
    assert not long, f"split these modules by concept: {long}"


def _private_imports() -> list[str]:
    """``from <project module> import _name``: one module reaching into another's private names."""
    modules = _modules()
    found = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PACKAGES):
                found += [f"{name}: {a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    return found


def test_modules_use_each_others_public_names_only():
    assert not _private_imports()


def test_the_effect_machinery_has_one_home():
    """Statistics, nulls, cells and the stage runner are defined once (the modules the docs name), and the
    shared command-line glue lives below both packages (``sae_training`` never imports ``ipg_sae.cli``)."""
    homes = {"bootstrap": "ipg_sae.stats", "null_rank": "ipg_sae.stats", "effective_sample_size": "ipg_sae.stats",
             "area_under_curve": "ipg_sae.stats", "predicted_direction": "ipg_sae.stats",
             "uniform_sets": "ipg_sae.nulls", "frequency_matched_sets": "ipg_sae.nulls", "frequency_bins": "ipg_sae.nulls",
             "CellStore": "ipg_sae.cells", "is_unsteered": "ipg_sae.cells", "run_stages": "ipg_sae.experiments.stages",
             "Stage": "ipg_sae.experiments.stages", "run_job": "ipg_sae.command", "load_saes": "ipg_sae.saes",
             "file_digest": "ipg_sae.digest", "prompt_groups": "ipg_sae.trajectories"}
    defined: dict[str, list[str]] = {}
    for name, path in _modules().items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in homes:
                defined.setdefault(node.name, []).append(name)
    assert {k: v for k, v in defined.items()} == {k: [v] for k, v in homes.items()}
    graph = import_graph()
    assert "ipg_sae.cli" not in graph["sae_training.__main__"]
    assert not {"ipg_sae.jobs", "ipg_sae.experiments.pipeline"} & graph["ipg_sae.explorer"]


EXPERIMENTS = ("ipg_sae.experiments.pipeline", "ipg_sae.experiments.study", "ipg_sae.experiments.origins",
               "ipg_sae.experiments.steering_bench")


def _experiment_of(module: str) -> str | None:
    """The experiment a module belongs to; an experiment's torch-free settings module beside it
    (``pipeline_config.py``, so that its --help needs no torch) is part of that experiment."""
    return next((e for e in EXPERIMENTS if module in (e, f"{e}_config") or module.startswith(e + ".")), None)


def test_the_experiments_are_a_layer_above_the_library():
    """The library never imports an experiment (only the command line does), and no experiment imports another:
    what two experiments share lives in ``experiments/common.py`` or ``experiments/stages.py``."""
    graph = import_graph()
    assert all(_experiment_of(e) == e for e in EXPERIMENTS) and all(e in graph for e in EXPERIMENTS)
    for name, targets in graph.items():
        if not name.startswith("ipg_sae.experiments") and name != "ipg_sae.cli":
            assert not {t for t in targets if t.startswith("ipg_sae.experiments")}, f"{name} imports an experiment"
        mine = _experiment_of(name)
        if mine is None:
            continue
        siblings = {t for t in targets if _experiment_of(t) not in (None, mine)}
        assert not siblings, f"{name} imports another experiment: {sorted(siblings)}"
    assert "ipg_sae.experiments.study" in graph["ipg_sae.cli"]  # the check sees the layer at all


def test_no_test_file_imports_another():
    """Tests stand alone: what several test files share lives in ``conftest.py`` or ``tests/helpers.py``, and a
    config names reward plugins from ``tests.helpers``, never from another test file."""
    found = []
    for path in sorted((REPO / "tests").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name} imports {n}" for n in names if re.match(r"tests\.test_", n)]
        found += [f"{path.name} names {m}" for m in re.findall(r"tests\.(test_\w+):", text) if m != path.stem]
    assert not found, found
