"""The layout's rules: one-way layers, inference-only tokenizers, small functions and modules, and
the smoke configs' losses bit-identical to the goldens made before the one-way refactor."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gqlm"

# Each layer imports only from itself and the layers before it (longest module prefix decides).
LAYERS = (
    ("config", ("gqlm", "gqlm.config", "gqlm.distributed", "gqlm.mesh", "gqlm.cli", "gqlm.presets")),
    ("data sources", ("gqlm.data.sources",)),
    ("tokenizers", ("gqlm.tokenizers",)),
    ("data pipeline", ("gqlm.data",)),
    ("models, optimizers", ("gqlm.models", "gqlm.optim")),
    ("interop", ("gqlm.interop",)),
    ("train", ("gqlm.train",)),
    ("eval and entry points", ("gqlm.eval", "gqlm.score", "gqlm.sample", "gqlm.tokenize", "gqlm.prepare",
                               "gqlm.export", "gqlm.lm_eval")),
)
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 60, 400


def module_names() -> dict[str, pathlib.Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported_modules(name: str, path: pathlib.Path, known: dict) -> set[str]:
    """gqlm modules `name` imports anywhere in its file, function bodies included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = module_names()
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def layer_of(module: str) -> int:
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
                if module == p or module.startswith(p + ".")), default=None)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best[1]


def test_the_import_graph_parses_relative_and_local_imports():
    graph = import_graph()
    assert "gqlm.train.experiment" in graph["gqlm.train.loop"]
    assert "gqlm.tokenizers.gqvae.model" in graph["gqlm.tokenizers.gqvae.tokenizer"]
    assert graph["gqlm.config"] >= {"gqlm.config.model", "gqlm.config.errors"}


def test_layers_import_only_from_earlier_layers():
    graph = import_graph()
    wrong = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
             for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a)]
    assert not wrong, "\n".join(wrong)


def test_import_graph_is_acyclic():
    graph, state, cycle = import_graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycle.extend(stack[stack.index(dep):] + [dep])
                return True
            if dep not in state and visit(dep, stack + [dep]):
                return True
        state[node] = "done"
        return False

    assert not any(visit(n, [n]) for n in sorted(graph) if n not in state), " -> ".join(cycle)


def test_tokenizers_do_not_import_the_training_stack():
    code = "import sys, gqlm.tokenizers; print(sorted(m for m in sys.modules if m.startswith(('gqlm.train', 'gqlm.data'))))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("folder", ["gqlm", "launch"])
def test_functions_and_modules_stay_small(folder):
    too_long = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, "\n".join(too_long)


@pytest.mark.slow
def test_smoke_losses_are_bit_identical_to_the_goldens():
    sys.path.insert(0, str(ROOT / "tests" / "goldens"))
    from make_smoke_losses import GOLDEN, train_losses
    golden = json.loads(GOLDEN.read_text())
    for name, run in golden.items():
        assert train_losses(run["spec"], tuple(run["overrides"])) == run["losses"], name
