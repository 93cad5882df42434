"""The package layout: imports only go downward, `import k2jax` stays light, no module grows past 400 lines."""

import ast
import os
import subprocess
import sys

import pytest

import k2jax

ROOT = os.path.dirname(k2jax.__file__)

# The layers of k2jax, lowest first: a package may import its own modules and those of lower layers only
# (packages in one layer are independent of each other). k2jax/__init__.py, the lazy facade, is exempt.
LAYERS = [
    ("errors", "runtime", "hardware", "progress"),
    ("storage",),
    ("model",),
    ("text",),
    ("data",),
    ("ckpt",),
    ("inference", "train"),
    ("report",),
    ("aot", "testing", "explore"),
    ("cli",),
]
# inside k2jax.model, the same rule by module
MODEL_LAYERS = [("config", "params", "sharding", "cache", "quant"), ("factory",), ("layers",), ("transformer",),
                ("init", "adapters")]


def _level(layers, name):
    for i, group in enumerate(layers):
        if name in group:
            return i
    raise AssertionError(f"{name} is in no layer of tests/test_layout.py")


def _k2jax_imports(source: str):
    """(line, imported module path) of every import of a k2jax module, function-local ones included."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "k2jax" else [])
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "k2jax" and len(parts) > 1:
                yield node.lineno, parts[1:]


def upward_imports(module_parts, source: str) -> list[str]:
    """The imports in `source` (the module k2jax.<module_parts>) that reach a higher or a sibling layer."""
    bad = []
    for line, target in _k2jax_imports(source):
        pkg, tgt = module_parts[0], target[0]
        if pkg == tgt:
            if pkg == "model" and len(module_parts) > 1 and len(target) > 1:
                if _level(MODEL_LAYERS, target[1]) > _level(MODEL_LAYERS, module_parts[1]):
                    bad.append(f"line {line}: k2jax.{'.'.join(target)}")
            continue
        if tgt == "configs" and module_parts == ["model", "config"]:
            continue  # the preset files: data the config loader reads by name (they import only model.config)
        if tgt == "configs" or _level(LAYERS, tgt) >= _level(LAYERS, pkg):
            bad.append(f"line {line}: k2jax.{'.'.join(target)}")
    return bad


def _modules():
    for dirpath, _, files in os.walk(ROOT):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if rel == ["__init__"]:
                    continue
                yield path, [p for p in rel if p != "__init__"]


def test_every_import_goes_downward():
    found = {}
    for path, parts in _modules():
        with open(path) as f:
            bad = upward_imports(parts, f.read())
        if bad:
            found[os.path.relpath(path, ROOT)] = bad
    assert not found, found


def test_the_check_flags_upward_and_sibling_imports():
    """Positive controls: the checker flags what it must (else the test above could pass vacuously)."""
    assert upward_imports(["ckpt", "convert"], "from k2jax.cli.convert import run\n") == ["line 1: k2jax.cli.convert"]
    assert upward_imports(["train", "loop"], "def f():\n    from k2jax.inference import model\n")
    assert upward_imports(["model", "params"], "from k2jax.model.transformer import Transformer\n")
    assert upward_imports(["ckpt", "orbax"], "from k2jax import inference\n")
    assert not upward_imports(["train", "step"], "from k2jax.model.init import place\nimport jax\n")


def test_import_k2jax_loads_no_checkpointing_stack():
    code = ("import k2jax, sys; bad = [m for m in ('orbax', 'tensorstore', 'grain', 'torch') if m in sys.modules]; "
            "assert not bad, bad; k2jax.K2Config; k2jax.load_config('tiny'); "
            "assert 'orbax' not in sys.modules and 'tensorstore' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("name", sorted(k2jax.__all__))
def test_public_names_resolve(name):
    assert getattr(k2jax, name) is not None


def test_no_module_over_400_lines():
    long = {os.path.relpath(p, ROOT): n for p, _ in _modules() if (n := sum(1 for _ in open(p))) > 400}
    assert not long, long


def import_graph() -> dict[str, set[str]]:
    """{module: the k2jax modules it imports} over the whole package (function-local imports included; an import
    of a package counts as its __init__, `from PKG import NAME` as the module PKG.NAME where one exists)."""
    modules = {".".join(parts): path for path, parts in _modules()}
    graph = {}
    for name, path in modules.items():
        with open(path) as f:
            targets = set()
            for _, target in _k2jax_imports(f.read()):
                for n in range(len(target), 0, -1):  # the longest prefix that is a module
                    if ".".join(target[:n]) in modules:
                        targets.add(".".join(target[:n]))
                        break
        graph[name] = targets - {name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm): each is an import circle."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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


def test_no_import_circle_anywhere_in_the_package():
    """No two modules reach each other through imports, inside a package or across packages."""
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the graph was read
    assert not import_cycles(graph), import_cycles(graph)


def test_the_circle_check_finds_circles():
    """Positive control: a three-module circle and a two-module one are found, a chain is not."""
    found = import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}})
    assert found == [["a", "b", "c"], ["d", "e"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
