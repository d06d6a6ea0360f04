"""The project's import graph: every import points down the pipeline's layers, and nothing cycles.

    treeopt.core  ->  treeopt.decoding  ->  treeopt.calibrate | .search | .training  ->  treeopt.reports
        ->  treeopt (cli, demo, info)

Each layer is a folder at the top of the repository, installed as a subpackage of `treeopt`.

Read with `ast` (nothing is imported), function-level imports included."""

import ast
import re
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"treeopt": "treeopt", "core": "treeopt.core", "decoding": "treeopt.decoding",
           "calibrate": "treeopt.calibrate", "search": "treeopt.search", "training": "treeopt.training",
           "reports": "treeopt.reports"}  # folder -> the package it installs as (pyproject's package-dir)
LAYERS = {"treeopt.core": 0, "treeopt.decoding": 1, "treeopt.calibrate": 2, "treeopt.search": 2,
          "treeopt.training": 2, "treeopt.reports": 3, "treeopt": 4}
NO_TORCH = ("treeopt.core", "treeopt.search")  # pure numpy/pandas: importable without the model stack


def module_name(path: Path) -> str:
    folder, *parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join([FOLDERS[folder], *(parts[:-1] if parts[-1] == "__init__" else parts)])


def layer_of(module: str) -> str:
    """The layer key of a module: the longest LAYERS key it lies under."""
    return max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


def project_files(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p): p for folder in FOLDERS for p in (root / folder).rglob("*.py")}


def project_graph(root: Path = ROOT) -> nx.DiGraph:
    """module -> the project modules it imports."""
    files = project_files(root)
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for mod, path in files.items():
        for target in imports(path):
            if target in files and target != mod:
                graph.add_edge(mod, target)
    return graph


def violations(graph: nx.DiGraph) -> list[str]:
    """Upward or sideways imports between layers, and import cycles."""
    bad = [f"{a} -> {b} (layer {LAYERS[layer_of(a)]} imports layer {LAYERS[layer_of(b)]})"
           for a, b in graph.edges if layer_of(a) != layer_of(b) and LAYERS[layer_of(a)] <= LAYERS[layer_of(b)]]
    bad += ["cycle: " + " -> ".join(c) for c in nx.simple_cycles(graph)]
    return bad


def test_imports_point_down_and_never_cycle():
    assert violations(project_graph()) == []


@pytest.mark.parametrize("edge, why", [
    (("treeopt.core.tree", "treeopt.search.grow"), "layer 0 imports layer 2"),
    (("treeopt.search.grow", "treeopt.calibrate.run"), "layer 2 imports layer 2"),
    (("treeopt.decoding.decoder", "treeopt.cli"), "layer 1 imports layer 4"),
])
def test_the_check_catches_upward_and_sideways_imports(edge, why):
    graph = project_graph()
    graph.add_edge(*edge)
    assert any(why in v for v in violations(graph))


def test_the_check_catches_cycles():
    graph = project_graph()
    graph.add_edge("treeopt.core.tree", "treeopt.core.replay")  # replay imports tree: now a cycle
    assert any(v.startswith("cycle:") for v in violations(graph))


def test_the_core_and_search_do_not_need_torch():
    for mod, path in project_files().items():
        if layer_of(mod) in NO_TORCH:
            heavy = {t.split(".")[0] for t in imports(path)} & {"torch", "transformers"}
            assert not heavy, f"{mod} imports {heavy}"


def test_every_module_is_in_a_layer():
    for mod in project_graph():
        assert layer_of(mod) in LAYERS


def readme_diagram(readme: str) -> str:
    """The code block of the README's `## Layout` section."""
    return readme.split("## Layout", 1)[1].split("```")[1]


def diagram_gaps(diagram: str) -> list[str]:
    """What the layout diagram leaves out: a top-level package (its folder, `folder/`), or a module's stem."""
    gaps = [f"package {folder}/" for folder in FOLDERS if not re.search(rf"(?<![\w./]){folder}/", diagram)]
    gaps += [mod for mod, path in project_files().items()
             if path.stem not in ("__init__", "__main__") and not re.search(rf"\b{path.stem}\b", diagram)]
    return gaps


def test_the_readme_layout_names_every_module():
    """The README's layout diagram names every package and every module in it, so the map stays true."""
    assert diagram_gaps(readme_diagram((ROOT / "README.md").read_text())) == []


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_the_readme_check_catches_a_lost_package(folder):
    diagram = readme_diagram((ROOT / "README.md").read_text())
    lost = re.sub(rf"(?<![\w./]){folder}/", "", diagram)
    assert f"package {folder}/" in diagram_gaps(lost)


def test_the_readme_check_catches_a_lost_module():
    diagram = readme_diagram((ROOT / "README.md").read_text())
    assert "treeopt.search.crossval" in diagram_gaps(re.sub(r"\bcrossval\b", "", diagram))


def core_test_modules() -> list[str]:
    """The test modules that exercise only the torch-free layers: every project import in NO_TORCH, or
    the CLI (which imports the model stack only inside the commands that need it)."""
    out = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        found = imports(path)
        ours = {t for t in found if t.startswith("treeopt.")}
        if ours and all(layer_of(t) in NO_TORCH or t.startswith("treeopt.cli") for t in ours) \
                and not {t.split(".")[0] for t in found} & {"torch", "transformers"}:
            out.append(path.stem)
    return out


def test_the_core_tests_run_without_torch():
    """Importing the core's test modules (and conftest) loads no torch: they run where torch is absent."""
    import subprocess
    import sys

    mods = core_test_modules()
    assert {"test_tree", "test_replay"} <= set(mods)
    code = ("import sys; sys.path.insert(0, 'tests'); import conftest, " + ", ".join(mods) +
            "; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
