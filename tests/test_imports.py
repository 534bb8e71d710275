"""The package's dependencies point one way: the import graph of mhc_jax (read from the source with `ast`,
nothing is imported) has no cycle, and no function imports a package module at call time (a hidden
import is how a cycle gets papered over)."""

from __future__ import annotations

import ast
import os

from conftest import REPO_ROOT

PACKAGE = "mhc_jax"

# Function-level imports of package modules that are allowed, each with its reason: a light module that
# must not load a heavy dependency (Grain, TensorFlow Datasets: seconds of import time) until it is used.
ALLOWED_FUNCTION_IMPORTS: dict[tuple[str, str], str] = {
    ("mhc_jax.data", "mhc_jax.data.pipeline"):
        "`mhc_jax.data.make_train_iterator` loads Grain and TFDS on first use; the tokenizers and the batch "
        "layout import without them (package code imports mhc_jax.data.pipeline directly)",
    ("mhc_jax.data.tokenizer", "mhc_jax.data.corpus"):
        "only the `train` command reads a dataset; encoding and decoding never load TFDS",
}


def _modules() -> dict[str, str]:
    """{dotted module name: file path} for every .py file of the package."""
    out = {}
    root = os.path.join(REPO_ROOT, PACKAGE)
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, REPO_ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = path
    return out


def _targets(node: ast.Import | ast.ImportFrom, modules: dict[str, str]) -> list[str]:
    """The package modules an import statement loads (the deepest existing module of each name)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level or not (node.module or "").startswith(PACKAGE):
            return []
        names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                 for alias in node.names]
    return sorted({n for n in names if n in modules})


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(module -> package modules it imports at module level, [(module, imported, line)] of imports made
    inside a function or method)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    hidden = []
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _targets(child, modules):
                        if in_function:
                            hidden.append((module, target, child.lineno))
                        elif target != module:
                            graph[module].add(target)
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(tree, False)
    return graph, hidden


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules (first == last), or [] (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def dfs(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = dfs(dep)
                if found:
                    return found
        state[m] = 2
        path.pop()
        return []

    for m in sorted(graph):
        if m not in state:
            found = dfs(m)
            if found:
                return found
    return []


def listing(graph: dict[str, set[str]]) -> str:
    """The graph as text, one module per line with what it imports (for notes and reviews)."""
    return "\n".join(f"{m} -> {', '.join(sorted(graph[m])) or '(nothing in the package)'}" for m in sorted(graph))


def test_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_package_import_graph_has_no_cycle():
    graph, _ = import_graph()
    assert len(graph) > 30  # every module was read
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle) + "\n\n" + listing(graph)


def test_no_function_imports_a_package_module():
    _, hidden = import_graph()
    bad = [f"{m}:{line} imports {target}" for m, target, line in hidden
           if (m, target) not in ALLOWED_FUNCTION_IMPORTS]
    assert not bad, "imports inside functions (move them to the top of the module):\n" + "\n".join(bad)


# Leaf modules take what they use (issue 13): layers, connections and the Engram package get their config
# section (ModelConfig, ResidualConfig, EngramConfig) and explicit model arguments, never the whole Config.
LEAF_PACKAGES = ("mhc_jax.layers", "mhc_jax.residual", "mhc_jax.engram", "mhc_jax.model")
# The model's assembly: the transformer splits the whole Config into the sections and sizes its leaves take
# (and the block-memory probe builds a block the same way).
WHOLE_CONFIG_ALLOWED = {"mhc_jax.model.transformer": "builds blocks and leaves from the whole Config",
                        "mhc_jax.model.memory": "compiles one Block(cfg) of the transformer",
                        "mhc_jax.model.param_count": "the closed-form count of the whole Transformer(cfg)"}


def whole_config_uses(source: str) -> list[int]:
    """Lines where `source` imports the whole `Config` (or reaches it as `config.Config`)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("config") \
                and any(alias.name == "Config" for alias in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "Config":
            lines.append(node.lineno)
    return sorted(lines)


def test_whole_config_finder_sees_an_import_and_an_attribute_and_accepts_sections():
    assert whole_config_uses("from mhc_jax.config import Config, EngramConfig\n") == [1]
    assert whole_config_uses("import mhc_jax.config as c\ndef f(x: c.Config): pass\n") == [2]
    assert whole_config_uses("from mhc_jax.config import EngramConfig, ResidualConfig\n") == []


def test_leaf_modules_do_not_take_the_whole_config():
    bad = []
    for module, path in _modules().items():
        if module.startswith(LEAF_PACKAGES) and module not in WHOLE_CONFIG_ALLOWED:
            with open(path, encoding="utf-8") as f:
                bad += [f"{module}:{line}" for line in whole_config_uses(f.read())]
    assert not bad, "leaf modules take their config section and explicit arguments, not Config:\n" + "\n".join(bad)


if __name__ == "__main__":
    print(listing(import_graph()[0]))
