"""The package's shape, enforced: what may import what, and how big a file gets.

docs/architecture.md describes the layout these rules keep. The core library
(tasks, processes, cgroups, output, the manager) knows nothing of gRPC; the
gRPC adapter, the TLS glue, the client and the CLI sit outside it and only
ever call inwards. The rules read the source with ``ast`` (function-level
imports included), so they check the installed package without importing it.
"""

import ast
import os
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Set

import taskman

PACKAGE_DIR = Path(taskman.__file__).resolve().parent
MAX_LINES = 400

# Modules that adapt the core to gRPC, TLS and the command line: everything
# else under taskman/ is the core.
OUTER_MODULES = {
    "taskman.service",
    "taskman.guard",
    "taskman.server",
    "taskman.tls",
    "taskman.credentials",
    "taskman.client",
}
OUTER_PACKAGES = {"taskman.cli", "taskman.api"}

# What the core must never import from, at any level.
FORBIDDEN_TO_CORE = ("taskman.service", "taskman.guard", "taskman.server", "taskman.tls",
                     "taskman.client", "taskman.cli")

# The generated stubs import grpc themselves: importing them is importing grpc.
GRPC_STUBS = "taskman.api.task_manager_pb2_grpc"


class Import(NamedTuple):
    target: str  # absolute dotted name, resolved to the most precise module
    qualified: str  # what was named: ``from taskman import server`` is taskman.server
    line: int
    top_level: bool  # runs when the module is imported (not inside a function)

    def reaches(self, name: str) -> bool:
        """True if this imports module ``name`` or something inside it,
        even a module that does not exist yet."""
        return within(self.target, name) or within(self.qualified, name)


class Module(NamedTuple):
    name: str
    path: Path
    imports: List[Import]

    @property
    def relative(self) -> str:
        return str(self.path.relative_to(PACKAGE_DIR.parent))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> Iterator[Path]:
    for directory, subdirectories, files in os.walk(PACKAGE_DIR):
        subdirectories[:] = sorted(d for d in subdirectories if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(directory, name)


def is_type_checking_block(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` bodies never run, so they cannot form a cycle."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def walk_imports(node: ast.AST, top_level: bool) -> Iterator[tuple]:
    """Yields (import node, runs at import time) for every import under node."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, top_level
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from walk_imports(child, False)
        elif is_type_checking_block(child):
            for statement in child.body:
                yield from walk_imports(ast.Module(body=[statement], type_ignores=[]), False)
            for statement in child.orelse:
                yield from walk_imports(ast.Module(body=[statement], type_ignores=[]), top_level)
        else:
            yield from walk_imports(child, top_level)


def resolve(name: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` import names (relative ones resolved)."""
    if not node.level:
        return node.module or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def parse(path: Path, known: Set[str]) -> Module:
    name = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    imports = []
    for node, top_level in walk_imports(tree, True):
        if isinstance(node, ast.Import):
            named = [(alias.name, alias.name) for alias in node.names]
        else:
            base = resolve(name, path, node)
            # ``from package import submodule`` imports the submodule; any
            # other name comes from the package (or module) itself.
            named = [
                (f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base, f"{base}.{alias.name}")
                for alias in node.names
            ]
        imports.extend(Import(target, qualified, node.lineno, top_level) for target, qualified in named)
    return Module(name, path, imports)


def all_modules() -> Dict[str, Module]:
    paths = list(source_files())
    known = {module_name(path) for path in paths}
    return {module.name: module for module in (parse(path, known) for path in paths)}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def is_core(name: str) -> bool:
    return name not in OUTER_MODULES and not any(within(name, package) for package in OUTER_PACKAGES)


def is_grpc(imported: Import) -> bool:
    top = imported.target.split(".")[0]
    return top == "grpc" or top.startswith("grpc_") or imported.reaches(GRPC_STUBS)


def report(violations: List[str]) -> str:
    """One line per violation; a line naming two names from one module says it once."""
    return "\n".join(dict.fromkeys(violations))


def test_the_package_is_found_and_parsed():
    modules = all_modules()
    assert "taskman.manager" in modules, f"no taskman/manager.py under {PACKAGE_DIR}"
    assert any(is_core(name) for name in modules) and any(not is_core(name) for name in modules)


def test_the_core_never_imports_grpc():
    """The core is usable (and testable) without gRPC: one servicer adapts it."""
    violations = [
        f"{module.relative}:{imported.line} imports {imported.target}: the core library must not "
        "depend on gRPC (move the gRPC part to service.py, guard.py, server.py, tls.py or credentials.py)"
        for module in all_modules().values()
        if is_core(module.name)
        for imported in module.imports
        if is_grpc(imported)
    ]
    assert not violations, report(violations)


def test_the_core_never_imports_the_layers_above_it():
    """The data path reads one way: CLI -> client -> servicer -> manager -> ..."""
    violations = [
        f"{module.relative}:{imported.line} imports {imported.qualified}: the core must not reach back up "
        "to the servicer, server, TLS, client or CLI (pass what it needs in from there)"
        for module in all_modules().values()
        if is_core(module.name)
        for imported in module.imports
        if any(imported.reaches(outer) for outer in FORBIDDEN_TO_CORE)
    ]
    assert not violations, report(violations)


def test_the_cli_starts_without_the_server():
    """``taskman --help`` must not pay for the server's imports.

    Only cli/server.py may import ``taskman.server``, and only inside a
    function; no CLI module imports ``taskman.service`` at all (the server
    module is the one place that builds the servicer).
    """
    violations = []
    for module in all_modules().values():
        if not within(module.name, "taskman.cli"):
            continue
        for imported in module.imports:
            if imported.reaches("taskman.service"):
                violations.append(
                    f"{module.relative}:{imported.line} imports taskman.service: the CLI gets a server "
                    "from taskman.server, never the servicer directly"
                )
            elif imported.reaches("taskman.server"):
                if imported.top_level:
                    violations.append(
                        f"{module.relative}:{imported.line} imports taskman.server at module level: "
                        "CLI start-up must stay light (import it inside the function that serves)"
                    )
                elif module.name != "taskman.cli.server":
                    violations.append(
                        f"{module.relative}:{imported.line} imports taskman.server: only "
                        "taskman/cli/server.py may start a server"
                    )
    assert not violations, report(violations)


def import_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module, or a self-import (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for neighbour in sorted(graph.get(node, ())):
            if neighbour not in index:
                visit(neighbour)
                low[node] = min(low[node], low[neighbour])
            elif neighbour in on_stack:
                low[node] = min(low[node], index[neighbour])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_no_import_cycle_at_module_level():
    """A cycle makes import order matter and hides a seam in the wrong place."""
    modules = all_modules()
    graph = {
        name: {
            imported.target
            for imported in module.imports
            if imported.top_level and imported.target in modules and imported.target != name
        }
        for name, module in modules.items()
    }
    violations = []
    for component in import_cycles(graph):
        members = set(component)
        edges = [
            f"  {modules[name].relative}:{imported.line} imports {imported.target}"
            for name in component
            for imported in modules[name].imports
            if imported.top_level and imported.target in members and imported.target != name
        ]
        violations.append("import cycle among " + ", ".join(component) + ":\n" + "\n".join(edges))
    assert not violations, report(violations)


def test_no_file_over_the_size_limit():
    """A file past this size is doing more than one job: split it by owner."""
    violations = []
    for path in source_files():
        if within(module_name(path), "taskman.api"):
            continue  # generated
        with open(path, "rb") as source:
            lines = sum(1 for _ in source)
        if lines > MAX_LINES:
            violations.append(
                f"{path.relative_to(PACKAGE_DIR.parent)} has {lines} lines (limit {MAX_LINES}): "
                "split it into modules that each own one thing"
            )
    assert not violations, report(violations)
