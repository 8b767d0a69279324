"""The layers of the house, checked on the source (``ast``; nothing is imported).

The rules (docs/design.md, "Layers"):

(a) no import cycle among the core modules (``jeststream`` and its subpackages): every import
    counts, at module level or inside a function, since a lazy import is still a dependency;
(b) the core (``jeststream/*.py`` and its subpackages but the demo) never imports an adapter
    (``jeststream.adapters``, the top-level ``adapters/`` folder) at module level -- only
    lazily, inside the function that needs it;
(c) no module reaches into another's private names: no ``from x import _name``, no
    ``module._name`` on an imported module, and no patching of another module's attribute
    from outside (assignment, ``setattr``, ``mock.patch.object``), within ``jeststream``,
    ``adapters/`` and ``benchmarks/``.

Each rule's violations are enumerated and compared with its ``KNOWN_*`` set, which may only
shrink: a new violation fails, and so does a listed one that was fixed (remove it from the set,
so that it cannot come back unnoticed).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Where each package's source lives (pyproject's package-dir: jeststream.adapters is adapters/).
SOURCES = {
    "jeststream": ROOT / "jeststream",
    "jeststream.adapters": ROOT / "adapters",
    "benchmarks": ROOT / "benchmarks",
}
CORE = "jeststream"
ADAPTERS = "jeststream.adapters"
NOT_CORE = ("jeststream.adapters", "jeststream.demo")  # outside rule (b): the demo may use them

# -- the known violations, each set only shrinks ------------------------------------------------

# (a) strongly connected components of the core's import graph, as sorted module names.
KNOWN_CYCLES: set[tuple[str, ...]] = set()

# (b) (core module, adapter module) imported at module level.
KNOWN_CORE_IMPORTS_ADAPTER: set[tuple[str, str]] = set()

# (c) (importing module, owning module, private name or patched attribute).
KNOWN_PRIVATE_REACH_INS: set[tuple[str, str, str]] = set()


# -- scanning ------------------------------------------------------------------------------------


@dataclass
class Import:
    importer: str  # the module whose source holds the statement
    target: str  # the module imported (resolved to one of ours where it is one)
    name: str | None  # for `from target import name`: the name, else None
    lazy: bool  # inside a function body (not run when the importer is imported)
    line: int


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: list[Import] = field(default_factory=list)
    reach_ins: list[tuple[str, str, int]] = field(default_factory=list)  # (module, attr, line)


def module_name(package: str, root: Path, path: Path) -> tuple[str, bool]:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join([package, *parts]), is_package


def discover(sources: dict[str, Path] = SOURCES) -> dict[str, str]:
    """{module name: source text} of every module under ``sources``."""
    found = {}
    for package, root in sources.items():
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            name, _ = module_name(package, root, path)
            found[name] = path.read_text(encoding="utf-8")
    return found


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


class _Visitor(ast.NodeVisitor):
    def __init__(self, mod: Module, known: set[str]) -> None:
        self.mod, self.known = mod, known
        self.depth = 0  # function nesting
        self.aliases: dict[str, str] = {}  # local name -> our module it is bound to

    def _ours(self, name: str) -> bool:
        return name in self.known

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        # `if TYPE_CHECKING:` imports are never run: annotations, not dependencies
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _add(self, target: str, name: str | None, line: int) -> None:
        self.mod.imports.append(Import(self.mod.name, target, name, self.depth > 0, line))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, None, node.lineno)
            if alias.asname and self._ours(alias.name):
                self.aliases[alias.asname] = alias.name
            elif not alias.asname and self._ours(alias.name.split(".")[0]):
                pass  # `import jeststream.x` binds `jeststream`: reach-ins checked by full path

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = node.module or ""
        if node.level:
            source = _resolve_relative(self.mod.name, self.mod.is_package, node.level, node.module)
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            if self._ours(sub):  # `from pkg import module`
                self._add(sub, None, node.lineno)
                self.aliases[alias.asname or alias.name] = sub
            else:
                self._add(source, alias.name, node.lineno)

    def _owner(self, node: ast.AST) -> str | None:
        """Our module that an expression like ``alias`` or ``jeststream.loader`` names."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            dotted = []
            while isinstance(node, ast.Attribute):
                dotted.append(node.attr)
                node = node.value
            if isinstance(node, ast.Name):
                dotted.append(node.id)
                full = ".".join(reversed(dotted))
                return full if self._ours(full) else None
        return None

    def visit_Call(self, node: ast.Call) -> None:
        # setattr(module, "name", v), mock.patch.object(module, "name"), monkeypatch.setattr(...)
        func = node.func
        fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if fname in ("setattr", "object") and len(node.args) >= 2:
            owner = self._owner(node.args[0])
            attr = node.args[1]
            if (
                owner is not None
                and owner != self.mod.name
                and isinstance(attr, ast.Constant)
                and isinstance(attr.value, str)
            ):
                self.mod.reach_ins.append((owner, attr.value, node.lineno))
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        owner = self._owner(node.value)
        if owner is not None and owner != self.mod.name:
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            patched = isinstance(node.ctx, (ast.Store, ast.Del))
            if private or patched:
                self.mod.reach_ins.append((owner, node.attr, node.lineno))
        self.generic_visit(node)


def scan(sources: dict[str, str]) -> dict[str, Module]:
    """{module name: Module} with each module's imports and reach-ins, from ``{name: source}``
    (a package's own name is its ``__init__``'s)."""
    packages = {n.rsplit(".", 1)[0] for n in sources if "." in n}
    known = set(sources)
    modules = {}
    for name, text in sources.items():
        mod = Module(name, Path(name), is_package=name in packages)
        _Visitor(mod, known).visit(ast.parse(text, filename=name))
        modules[name] = mod
    return modules


def _is_core(name: str) -> bool:
    return (name == CORE or name.startswith(CORE + ".")) and not name.startswith(ADAPTERS)


def cycles(modules: dict[str, Module]) -> set[tuple[str, ...]]:
    """Strongly connected components of more than one core module (or one importing itself)."""
    graph = {
        n: sorted({i.target for i in m.imports if _is_core(i.target) and i.target in modules})
        for n, m in modules.items()
        if _is_core(n)
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: set[tuple[str, ...]] = set()

    def strong(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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
            if len(comp) > 1 or v in graph.get(v, ()):
                out.add(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def core_imports_of_adapters(modules: dict[str, Module]) -> set[tuple[str, str]]:
    return {
        (m.name, i.target)
        for m in modules.values()
        if _is_core(m.name) and not m.name.startswith(NOT_CORE)
        for i in m.imports
        if not i.lazy and (i.target == ADAPTERS or i.target.startswith(ADAPTERS + "."))
    }


def private_reach_ins(modules: dict[str, Module]) -> set[tuple[str, str, str]]:
    out = set()
    for m in modules.values():
        for i in m.imports:
            if (
                i.name is not None
                and i.name.startswith("_")
                and not i.name.startswith("__")
                and i.target in modules
                and i.target != m.name
            ):
                out.add((m.name, i.target, i.name))
        for owner, attr, _ in m.reach_ins:
            out.add((m.name, owner, attr))
    return out


def _compare(found: set, known: set, what: str, fix: str) -> None:
    new, fixed = sorted(found - known), sorted(known - found)
    assert not new, f"new {what} (fix them: {fix}):\n" + "\n".join(map(str, new))
    assert not fixed, (
        f"fixed {what} still listed as known: remove them from the set, so that they cannot "
        "come back unnoticed:\n" + "\n".join(map(str, fixed))
    )


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return scan(discover())


# -- the checks check: each rule on small sources that break it ----------------------------------


def test_the_scan_sees_the_whole_house(modules):
    for name in ("jeststream", "jeststream.loader", "jeststream.demo", "jeststream.demo.runs",
                 "jeststream.adapters.webdataset", "benchmarks.selection"):
        assert name in modules, name
    assert modules["jeststream"].is_package and not modules["jeststream.loader"].is_package
    loader = {i.target for i in modules["jeststream.loader"].imports}
    assert {"jeststream.superbatch", "jeststream.snapshot", "torch"} <= loader
    assert len(modules) >= 30


def test_the_rules_catch_what_they_forbid():
    mods = scan({
        "jeststream": "from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from jeststream.a import A\n",
        "jeststream.a": "import jeststream.b\nfrom jeststream.adapters import wds\n",
        "jeststream.b": "def f():\n    from . import a\n    return a._hidden\n",
        "jeststream.c": "from jeststream.b import _private, public\n"
                        "import jeststream.a as mod\nmod.hook = print\n"
                        "def g():\n    import jeststream.adapters.wds\n",
        "jeststream.sub": "",
        "jeststream.sub.d": "from ..c import public\nfrom .e import _own\n",
        "jeststream.sub.e": "import jeststream.sub.d\n_own = 1\n",
        "jeststream.demo": "import jeststream.adapters.wds\n",
        "jeststream.adapters": "",
        "jeststream.adapters.wds": "import jeststream.a\nfrom jeststream.a import __doc__\n",
        "benchmarks.x": "import unittest.mock as m\nimport jeststream.b as b\n"
                        "m.patch.object(b, 'f', None)\nsetattr(b, 'g', None)\n",
    })
    assert mods["jeststream.sub.d"].imports[0].target == "jeststream.c"  # relative, resolved
    # a lazy import is a dependency too; TYPE_CHECKING imports are not; adapters are no core
    assert cycles(mods) == {("jeststream.a", "jeststream.b"),
                            ("jeststream.sub.d", "jeststream.sub.e")}
    # module level only, and the demo may
    assert core_imports_of_adapters(mods) == {("jeststream.a", "jeststream.adapters.wds")}
    assert private_reach_ins(mods) == {
        ("jeststream.b", "jeststream.a", "_hidden"),
        ("jeststream.c", "jeststream.b", "_private"),
        ("jeststream.c", "jeststream.a", "hook"),
        ("jeststream.sub.d", "jeststream.sub.e", "_own"),
        ("benchmarks.x", "jeststream.b", "f"),
        ("benchmarks.x", "jeststream.b", "g"),
    }


# -- the rules on the house ----------------------------------------------------------------------


def test_no_import_cycle_among_core_modules(modules):
    _compare(cycles(modules), KNOWN_CYCLES, "import cycles among core modules",
             "move what both sides need into a module that imports neither")


def test_the_core_never_imports_an_adapter_at_module_level(modules):
    _compare(core_imports_of_adapters(modules), KNOWN_CORE_IMPORTS_ADAPTER,
             "module-level imports of jeststream.adapters in the core",
             "import it inside the function that needs it, where an issue allows it")


def test_no_module_reaches_into_another_modules_privates(modules):
    _compare(private_reach_ins(modules), KNOWN_PRIVATE_REACH_INS,
             "reach-ins into another module's private names or attributes",
             "give what is needed a public name or a public hook")


def test_no_test_module_imports_another():
    """Shared test code lives in tests/helpers.py and tests/conftest.py: importing a test module
    from another runs its module-level code twice over and couples unrelated files."""
    tests = scan(discover({"tests": ROOT / "tests"}))
    found = {
        (m.name, i.target if i.name is None else f"{i.target}.{i.name}")
        for m in tests.values()
        for i in m.imports
        if i.target.split(".")[-1].startswith("test_")
        or i.target.startswith("tests.test_")
        or (i.target in ("tests", "") and (i.name or "").startswith("test_"))
    }
    assert not found, sorted(found)
