"""The package's shape: imports go one way between layers, no cycles, small modules, and every
top-level module imports first in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower layers never import higher ones at module level (docs/design.md).
LAYERS = (
    ("fx_bk.errors", "fx_bk.config", "fx_bk._torch_internals", "fx_bk.layout", "fx_bk.autocast",
     "fx_bk.deferred_error", "fx_bk.empty_batch", "fx_bk.change_guard", "fx_bk.precision_guard",
     "fx_bk.step_guard", "fx_bk.losses", "fx_bk.models", "fx_bk.module_state",
     "fx_bk.user_code", "fx_bk.recurrent", "fx_bk.attention",
     "fx_bk.trace_decompositions", "fx_bk.backward_decompositions", "fx_bk.distributed",
     "fx_bk.secure_random", "fx_bk.sampling"),
    ("fx_bk.site",),
    ("fx_bk.cost_model", "fx_bk.kernels"),
    ("fx_bk.rules",),
    ("fx_bk.clipping",),
    ("passes",),
    ("fx_bk.runtime", "fx_bk.batch_inputs", "fx_bk.bk_function"),
    ("fx_bk.api", "fx_bk.explain", "fx_bk.privacy_engine", "fx_bk.criterion",
     "fx_bk.user_level", "fx_bk.adaptive_clipping", "fx_bk.dp_optimizer"),
    ("fx_bk.testing", "fx_bk.demo", "fx_bk.demo_lm", "fx_bk.integrations", "fx_bk.audit"),
)
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("fx_bk", "passes"):
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _layer(module: str) -> int | None:
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                if best is None or len(name) > best[1]:
                    best = (i, len(name))
    return None if best is None else best[0]


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _module_level_imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Our modules imported by top-level statements (``if TYPE_CHECKING:`` blocks excluded)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    todo = list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and not _is_type_checking(node):
            todo.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            todo.extend(node.body)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in known and m != module}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _module_level_imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if m != "fx_bk" and _layer(m) is None]
    assert not missing, f"add these modules to LAYERS (and docs/design.md): {missing}"


def test_imports_go_one_way():
    graph = _graph()
    upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
              for m, deps in graph.items() if m != "fx_bk"
              for d in deps if d != "fx_bk" and _layer(d) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_library_modules_are_small():
    big = {m: n for m, p in _modules().items()
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"split these modules (over {MAX_LINES} lines): {big}"


@pytest.mark.parametrize("first", ["passes", "passes.find_sites", "fx_bk.rules", "fx_bk.site",
                                   "fx_bk.testing", "fx_bk.runtime"])
def test_any_module_imports_first(first):
    code = (f"import {first}\nimport fx_bk\n"
            f"assert callable(fx_bk.transform) and callable(fx_bk.register_rule)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)
