"""The import drawing: the model imports nothing above it, and no module imports one that imports it back."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import gemma_jax

PACKAGE = pathlib.Path(gemma_jax.__file__).parent
MODEL = "gemma_jax.transformer"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """Everything a module imports, at any depth of its code (a function-level import counts too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:  # `from gemma_jax import quant` imports the submodule, not the package
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


GRAPH = {name: {m for m in imports(name) if m in MODULES} for name in MODULES}


def reachable(start: str) -> set[str]:
    """Modules `start` imports, directly or through others."""
    seen: set[str] = set()
    todo = list(GRAPH[start])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(GRAPH[m])
    return seen


def test_no_module_imports_one_that_imports_it_back():
    circles = sorted(name for name in MODULES if name in reachable(name))
    assert not circles, {name: sorted(m for m in reachable(name) if name in reachable(m)) for name in circles}


def test_the_model_imports_nothing_above_it():
    """`import gemma_jax.transformer` loads no module that imports the model, and no loaded module of ours
    imports optax or argparse (jax imports argparse and flax.nnx imports optax themselves, so their presence
    in sys.modules alone says nothing about our code)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")]))
    code = f"import json, sys, {MODEL}; print(json.dumps(sorted(sys.modules)))"
    loaded = set(
        json.loads(
            subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
        )
    )
    ours = {m for m in loaded if m in MODULES}
    assert MODEL in ours and "gemma_jax.block" in ours
    # The package's __init__ re-exports the model (it is the namespace every submodule is loaded through).
    above = sorted(m for m in ours - {"gemma_jax", MODEL} if MODEL in reachable(m))
    assert not above, f"importing the model loaded modules that import it: {above}"
    heavy = {m: sorted(imports(m) & {"optax", "argparse"}) for m in ours}
    assert not {m: found for m, found in heavy.items() if found}
