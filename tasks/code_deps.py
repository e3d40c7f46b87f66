"""A stage's code dependencies, computed from the imports its entry function really makes.

Walked statically with `ast`, so `dvc.yaml` can be rendered without importing torch:

- the entry module (`tasks.stages` for `tasks.stages:tokenize`) contributes its module-level
  imports and the imports of the functions the entry reaches by name, recursively (so the other
  stages' lazy imports in the same module are left out);
- every other project module it reaches contributes all its imports, module level or inside any
  function (a lazy import is still a dependency), transitively;
- importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`, so those count too.

Only modules under the given top-level packages (`CODE_ROOTS`) are followed; the result is a sorted
list of paths relative to the project root.
"""
from __future__ import annotations

import ast
from pathlib import Path


def module_file(root: Path, module: str) -> Path | None:
    """The source file of a dotted module name under `root`, or None if it is not a project module."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_inits(root: Path, module: str) -> list[str]:
    """`a.b.c` -> ["a", "a.b"] where those are packages (importing c runs their __init__)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts)) if module_file(root, ".".join(parts[:i]))]


def _imports(nodes, module: str, is_package: bool, root: Path) -> set[str]:
    """Dotted names of the project modules imported by the statements in `nodes` (walked fully)."""
    found = set()
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                found |= {a.name for a in sub.names}
            elif isinstance(sub, ast.ImportFrom):
                if sub.level:  # relative: resolve against this module's package
                    parts = module.split(".")[: len(module.split(".")) - sub.level + (1 if is_package else 0)]
                    base = ".".join(parts + ([sub.module] if sub.module else []))
                else:
                    base = sub.module or ""
                found.add(base)
                # `from pkg import mod` imports the module pkg.mod when there is one
                found |= {f"{base}.{a.name}" for a in sub.names if module_file(root, f"{base}.{a.name}")}
    return {m for m in found if module_file(root, m)}


def _reachable_functions(tree: ast.Module, start: str) -> list[ast.AST]:
    """The top-level functions and classes of a module that `start` reaches by name, itself included."""
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    if start not in defs:
        raise ValueError(f"{start} is not a top-level function of the module")
    seen, todo = [], [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        todo += [n.id for n in ast.walk(defs[name]) if isinstance(n, ast.Name) and n.id in defs and n.id not in seen]
    return [defs[n] for n in seen]


def _module_level(tree: ast.Module) -> list[ast.AST]:
    """Module statements outside function and class bodies (what runs on import)."""
    return [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


def imported_modules(root: Path, entries: list[str], roots: tuple[str, ...]) -> set[str]:
    """Dotted names of the project modules that calling each `module:function` in `entries` imports."""
    root = Path(root)
    todo: list[str] = []
    entry_modules = {e.split(":")[0] for e in entries}
    done: set[str] = set()
    for entry in entries:
        module, func = entry.split(":")
        tree = ast.parse(module_file(root, module).read_text())
        is_pkg = module_file(root, module).name == "__init__.py"
        todo += [module, *_imports(_module_level(tree) + _reachable_functions(tree, func), module, is_pkg, root)]
    while todo:
        module = todo.pop()
        if module in done or module.split(".")[0] not in roots:
            continue
        done.add(module)
        todo += _package_inits(root, module)
        if module in entry_modules:  # walked from its entry function above, not as a whole
            continue
        path = module_file(root, module)
        todo += _imports([ast.parse(path.read_text())], module, path.name == "__init__.py", root)
    return done


def imported_files(root: Path, entries: list[str], roots: tuple[str, ...]) -> list[str]:
    """`imported_modules` as sorted paths relative to `root`."""
    root = Path(root)
    return sorted(module_file(root, m).relative_to(root).as_posix() for m in imported_modules(root, entries, roots))
