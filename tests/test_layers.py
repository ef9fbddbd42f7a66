"""The import graph keeps the layers: kernels <- models <- train <- launchers, with the
umbrella's own modules (``simcot/*.py``: collectives, config fields) below all of them.

Every import statement counts, including those inside functions: a lazy import still makes
the module depend on its target, and one that closes a cycle only hides it. The graph is read
from the source (ast), with modules named as setup.cfg maps the folders into ``simcot``.
"""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("simcot.kernels", "simcot.models", "simcot.train", "simcot.launchers")  # low to high


def source_modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every package setup.cfg maps (sub-packages included)."""
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    dirs = {}
    for line in cfg["options"]["package_dir"].strip().splitlines():
        pkg, folder = (x.strip() for x in line.split("="))
        dirs[pkg] = root / folder
    mods = {}
    for pkg, folder in dirs.items():
        for f in folder.glob("*.py"):
            mods[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The simcot module `name` refers to: itself, or its longest prefix that is a module."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_edges(root: Path = ROOT) -> list[tuple[str, str, str, bool]]:
    """(importer, imported, 'file:line', inside a function) for every import of a simcot module."""
    mods = source_modules(root)
    edges = []
    for mod, path in sorted(mods.items()):
        package = mod if path.stem == "__init__" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package, `level - 1` up
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                # `from pkg import sub` names the module pkg.sub when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            where = f"{path.relative_to(root)}:{node.lineno}"
            for t in targets:
                target = _resolve(t, mods) if t.startswith("simcot") else None
                if target and target != mod:
                    edges.append((mod, target, where, id(node) in in_function))
    return edges


def _layer(mod: str) -> int:
    """Index in LAYERS, or -1 for the umbrella's own modules (simcot.parallel, simcot.options)."""
    return next((i for i, layer in enumerate(LAYERS) if mod == layer or mod.startswith(layer + ".")), -1)


def layer_violations(root: Path = ROOT) -> list[str]:
    """Imports that point up the layers (a module's own package `simcot` aside)."""
    return sorted({f"{where}: {src} imports {dst}" for src, dst, where, _ in import_edges(root)
                   if dst != "simcot" and _layer(dst) > _layer(src)})


def import_cycles(root: Path = ROOT) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for src, dst, _, _ in import_edges(root):
        graph.setdefault(src, set()).add(dst)
        graph.setdefault(dst, set())
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def files_mentioning(word: str, root: Path = ROOT) -> list[str]:
    """Source files (package modules and benchmarks, not tests) whose text contains `word`."""
    files = list(source_modules(root).values()) + sorted((root / "benchmarks").glob("*.py"))
    return sorted(str(f.relative_to(root)) for f in files if word in f.read_text())


def test_the_graph_is_read():
    """The checks below see the imports they are meant to police (a parser that finds nothing passes all)."""
    edges = import_edges()
    pairs = {(s, d) for s, d, _, _ in edges}
    assert ("simcot.train.runner", "simcot.train.loop") in pairs
    assert ("simcot.models.rollout", "simcot.parallel") in pairs
    assert ("simcot.kernels.zero3", "simcot.parallel") in pairs
    assert any(lazy for _, _, _, lazy in edges)  # imports inside functions are read too


def test_no_layer_imports_a_higher_one():
    assert layer_violations() == []


def test_no_import_cycle_between_simcot_modules():
    assert import_cycles() == []


def test_zero3_partitioning_is_detected_in_one_module():
    assert files_mentioning("ds_id") == ["simcot/parallel.py"]


def method_name_tests(root: Path = ROOT) -> list[str]:
    """'file:line' of every comparison with a method's name outside train/methods/ (``== "codi"``,
    ``in ("coconut", ...)``, ``.startswith("simcot")``): what a method is, the method answers."""
    from simcot.train.methods import METHODS

    names = set(METHODS)
    prefixes = {n.split("-")[0] for n in names} | names
    methods_dir = root / "train" / "methods"
    found = []
    for mod, path in sorted(source_modules(root).items()):
        if methods_dir in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            consts = []
            if isinstance(node, ast.Compare):
                for c in [node.left, *node.comparators]:
                    elts = c.elts if isinstance(c, (ast.Tuple, ast.List, ast.Set)) else [c]
                    consts += [e.value for e in elts if isinstance(e, ast.Constant) and e.value in names]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "startswith" and node.args and isinstance(node.args[0], ast.Constant)):
                consts += [node.args[0].value] if node.args[0].value in prefixes else []
            found += [f"{path.relative_to(root)}:{node.lineno}" for _ in consts[:1]]
    return found


def test_no_method_name_is_compared_outside_the_methods():
    assert method_name_tests() == []


def test_the_method_name_check_finds_a_comparison(tmp_path):
    for folder in ("simcot", "train/methods", "train/tracking"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "setup.cfg").write_text("[options]\npackage_dir =\n    simcot = simcot\n    simcot.train = train\n"
                                        "    simcot.train.methods = train/methods\n")
    (tmp_path / "train" / "sweep.py").write_text('def f(m):\n    return m in ("coconut", "x")\n')
    (tmp_path / "train" / "methods" / "codi.py").write_text('def g(m):\n    return m == "codi"\n')
    assert method_name_tests(tmp_path) == ["train/sweep.py:2"]
