"""The code's layers only look down (docs/guide/architecture.md): every import of ``pargo_jax``,
``data_pipelines`` and ``experiments``, top-level or inside a function, goes to its own layer or a
lower one, and no modules import each other in a circle. Read from the source with ``ast`` (nothing
is imported), so the test takes a second.

An ``if __name__ == "__main__":`` block is the module's command line, not part of what importing it
gives: its imports count as the command-line layer's, and it closes no circle (the module runs as
``__main__``, a different module from the one its imports load)."""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pargo_jax", "data_pipelines", "experiments")

# module prefix -> layer; the longest prefix names a module's layer. An import may go to its own layer
# or lower ones only.
CLI = 7
LAYERS: dict[str, int] = {
    # 0 foundation: settings, paths, param trees, process / device setup, checkpoints, metrics, optimizer
    "pargo_jax.configs": 0,
    "pargo_jax.paths": 0,
    "pargo_jax.param_tree": 0,
    "pargo_jax.host_memory": 0,
    "pargo_jax.process_setup": 0,
    "pargo_jax.launcher": 0,
    "pargo_jax.sharding": 0,
    "pargo_jax.checkpoints": 0,
    "pargo_jax.metrics": 0,
    "pargo_jax.optim": 0,
    # 1 data: records, builders, the input pipeline, tokenizer
    "data_pipelines": 1,
    # 2 models: modules and their configs, LoRA, decoding, FLOPs
    "pargo_jax.models": 2,
    "pargo_jax.lora": 2,
    "pargo_jax.generate": 2,
    "pargo_jax.flops": 2,
    # 3 experiment configs
    "experiments": 3,
    # 4 file formats: checkpoints of HF, timm / EVA, BERT and the release <-> our params
    "pargo_jax.convert": 4,
    # 5 a run: config -> model + params, the workdir
    "pargo_jax.runs": 5,
    # 6 apps
    "pargo_jax.prepare": 6,
    "pargo_jax.demo_tower": 6,
    "pargo_jax.demo_mae": 6,
    "pargo_jax.train": 6,
    "pargo_jax.predictor": 6,
    "pargo_jax.evaluators": 6,
    "pargo_jax.evaluate": 6,
    "pargo_jax.export": 6,
    "pargo_jax.import_official": 6,
    # 7 command lines, tools and benchmarks (programs nothing imports)
    "pargo_jax.main": CLI,
    "pargo_jax.predict": CLI,
    "pargo_jax.tools": CLI,
    "pargo_jax.benchmarks": CLI,
}


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def source_modules() -> dict[str, str]:
    """``{dotted name: file}`` of every module of :data:`PACKAGES`."""
    out = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                if f.endswith(".py"):
                    out[module_name(os.path.join(folder, f))] = os.path.join(folder, f)
    return out


def is_main_block(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":``"""
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def imported(node: ast.Import | ast.ImportFrom, module: str, modules: dict[str, str]) -> Iterator[str]:
    """The modules an import statement of ``module`` loads (``from P import m`` loads ``P.m`` when
    that is a module, else ``P``); only those of :data:`PACKAGES`."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the package of ``module``
            is_package = modules.get(module, "").endswith("__init__.py")
            parts = module.split(".")[: len(module.split(".")) - node.level + is_package]
            base = ".".join(parts + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    for name in names:
        if name.split(".")[0] in PACKAGES:
            yield name


def import_edges() -> list[tuple[str, str, int, bool]]:
    """``(importer, imported, line, in a __main__ block)`` for every import in the packages."""
    modules = source_modules()
    edges = []
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        main_blocks = [n for n in tree.body if is_main_block(n)]
        in_main = {id(n) for block in main_blocks for n in ast.walk(block)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported(node, module, modules):
                    edges.append((module, target, node.lineno, id(node) in in_main))
    return edges


def layer(module: str) -> int | None:
    prefixes = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(prefixes, key=len)] if prefixes else None


def upward(edges: list[tuple[str, str, int, bool]]) -> list[str]:
    """Imports that go to a higher layer (or to a module with no layer), as ``file:line`` lines."""
    wrong = []
    for src, dst, line, in_main in edges:
        src_layer = CLI if in_main else layer(src)
        if src_layer is None or layer(dst) is None:
            wrong.append(f"{src}:{line} -> {dst}: no layer for {src if src_layer is None else dst}")
        elif layer(dst) > src_layer:
            wrong.append(f"{src}:{line} (layer {src_layer}) -> {dst} (layer {layer(dst)})")
    return wrong


def circles(edges: list[tuple[str, str, int, bool]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (or a module importing itself), of the
    imports outside ``__main__`` blocks."""
    graph: dict[str, set[str]] = {}
    for src, dst, _, in_main in edges:
        if not in_main:
            graph.setdefault(src, set()).add(dst)
            graph.setdefault(dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1 or node in graph[node]:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_import_looks_down():
    edges = import_edges()
    assert len(edges) > 200  # the walk reads the packages' imports
    assert not upward(edges), "\n".join(upward(edges))


def test_no_modules_import_each_other_in_a_circle():
    assert not circles(import_edges())


def test_the_checks_catch_an_upward_import_and_a_circle():
    """The two checks on made-up imports: models -> train climbs four layers; runs -> convert ->
    runs is a circle; the same import from a ``__main__`` block is a command line's and passes."""
    climbs = [("pargo_jax.models.mllm", "pargo_jax.train", 1, False)]
    assert upward(climbs) == ["pargo_jax.models.mllm:1 (layer 2) -> pargo_jax.train (layer 6)"]
    assert not upward([("pargo_jax.models.mllm", "pargo_jax.train", 1, True)])
    assert upward([("pargo_jax.train", "tests.demo", 3, False)]) == [
        "pargo_jax.train:3 -> tests.demo: no layer for tests.demo"
    ]
    loop = [
        ("pargo_jax.runs", "pargo_jax.convert.hf", 1, False),
        ("pargo_jax.convert.hf", "pargo_jax.runs", 2, False),
    ]
    assert circles(loop) == [["pargo_jax.convert.hf", "pargo_jax.runs"]]
    assert not circles([loop[0], (*loop[1][:3], True)])


def test_relative_and_package_imports_resolve_to_modules():
    edges = {(src, dst) for src, dst, _, _ in import_edges()}
    assert (
        "pargo_jax.convert.hf_code.modeling_pargo",
        "pargo_jax.convert.hf_code.configuration_pargo",
    ) in edges
    assert ("pargo_jax.runs", "pargo_jax.convert.bert") in edges  # from pargo_jax.convert import bert, ...
    assert ("pargo_jax.train", "pargo_jax.runs") in edges  # from pargo_jax import ..., runs, ...


def test_only_a_benchmarks_own_test_imports_it():
    """``tests/test_*benchmark_NAME.py`` may import ``pargo_jax.benchmarks.NAME``; other tests take
    their references and helpers from ``tests/``."""
    tests_dir = os.path.join(ROOT, "tests")
    modules = source_modules()
    wrong = []
    for f in sorted(os.listdir(tests_dir)):
        if not f.endswith(".py"):
            continue
        with open(os.path.join(tests_dir, f), encoding="utf-8") as src:
            tree = ast.parse(src.read(), f)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported(node, f"tests.{f[:-3]}", modules):
                    name = target.removeprefix("pargo_jax.benchmarks").lstrip(".")
                    own = f.endswith(f"benchmark_{name}.py")
                    if target.startswith("pargo_jax.benchmarks") and not own:
                        wrong.append(f"tests/{f}:{node.lineno} imports {target}")
    assert not wrong, "\n".join(wrong)


def defines(path: str, dotted: str) -> bool:
    """Whether the file defines ``dotted`` (``function`` or ``Class.method``) at its top level."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        scope: list[ast.stmt] = ast.parse(f.read(), path).body
    for name in dotted.split("."):
        found = [n for n in scope if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name == name]
        if not found:
            return False
        scope = found[0].body
    return True


def test_the_architecture_page_names_real_functions():
    """Every ``file.py:function`` of docs/guide/architecture.md is defined there."""
    with open(os.path.join(ROOT, "docs", "guide", "architecture.md"), encoding="utf-8") as f:
        named = re.findall(r"`([\w/]+\.py):([\w.]+)`", f.read())
    assert len(named) > 20
    assert [f"{path}:{name}" for path, name in named if not defines(path, name)] == []
    assert not defines("pargo_jax/train.py", "prepare_data")  # and the check can fail
