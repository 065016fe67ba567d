"""The project's shape holds: no import cycle anywhere, grpc and protobuf only in the wire layer, each layer of
node/ importing only what its package docstring allows, and at most two folders below the top level."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("chain", "fl", "storage", "node", "proto")
TOP_MODULES = ("main", "console", "config")
GENERATED = ("proto/fledger_pb2.py", "proto/fledger_pb2_grpc.py")


def project_files() -> list[Path]:
    files = [ROOT / f"{name}.py" for name in TOP_MODULES]
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return [f for f in files if f.relative_to(ROOT).as_posix() not in GENERATED]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(f): f for f in project_files()}


def imports_of(path: Path) -> set[str]:
    """Every module named by an import anywhere in the file (lazy and TYPE_CHECKING imports included)."""
    names: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports (a name resolves to the longest module it names)."""
    out = set()
    for name in imports_of(path):
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module_name(path):
            out.add(name)
    return out


GRAPH = {name: project_imports(path) for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if state.get(start) is None and (found := visit(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_anywhere_in_the_project() -> None:
    assert find_cycle(GRAPH) is None


def test_grpc_and_protobuf_are_imported_only_by_the_wire_layer() -> None:
    wire = ("node.rpc", "proto")
    offenders = sorted(name for name, path in MODULES.items()
                       if not name.startswith(wire) and any(i.split(".")[0] in ("grpc", "grpc_health", "google")
                                                            or i.startswith("proto") for i in imports_of(path)))
    assert offenders == []


# What each layer of node/ may import from the project (see each package's __init__ docstring).
ALLOWED = {
    "node.engine": ("chain", "fl", "storage", "config", "node.engine", "node.ledger", "node.run"),
    "node.sim": ("chain", "fl", "storage", "config", "node.engine", "node.ledger", "node.run", "node.sim"),
    "node.rpc": ("chain", "fl", "proto", "node.engine", "node.ledger", "node.rpc", "node.security"),
    "node.process": ("chain", "fl", "config", "node.engine", "node.ledger", "node.run", "node.rpc", "node.process",
                     "node.security"),
    "node.console": ("chain", "node.engine", "node.rpc.clients", "node.rpc.options", "node.console", "node.security"),
    "node.ledger": ("chain", "storage"),
    "node.security": ("chain", "node.security"),
    "node.run": ("chain", "fl", "config", "node.engine.edge", "node.engine.errors", "node.engine.receipts",
                 "node.engine.types", "node.engine.clock", "node.engine.profiles", "node.engine.scenario",
                 "node.engine.traces"),
    "chain": ("chain",),
    "fl": ("fl",),
    "storage": ("chain", "storage"),
}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_what_it_may(layer: str) -> None:
    allowed = ALLOWED[layer]
    wrong = {name: sorted(i for i in deps if not i.startswith(allowed))
             for name, deps in GRAPH.items() if name == layer or name.startswith(layer + ".")}
    assert {name: deps for name, deps in wrong.items() if deps} == {}


def test_servicers_hold_no_domain_state() -> None:
    """A servicer's __init__ only keeps what it was given (no tables, locks or pending blocks of its own)."""
    tree = ast.parse((ROOT / "node" / "rpc" / "services.py").read_text())
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        init = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
        params = {a.arg for a in init.args.args}
        for stmt in init.body:
            assert isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Name) and stmt.value.id in params, \
                f"{cls.name}.__init__ keeps state of its own: {ast.unparse(stmt)}"


def test_at_most_two_folders_below_the_top_level_and_every_folder_says_what_it_holds() -> None:
    for path in project_files():
        assert len(path.relative_to(ROOT).parts) <= 3, path
    for init in [p for p in project_files() if p.name == "__init__.py"]:
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"
