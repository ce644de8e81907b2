"""The package's shape: imports run one way (op <- passes <- pipeline <- robust / compile <- tools), with no
cycle between modules (function-level imports included); graph meta keys are spelled in one module only; the
wheel contains every module."""
import ast
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import networkx as nx
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Layers, lowest first: a module may import its own layer and the layers below, never a layer above.
LAYERS = [
    ("base", {"fxsparse._meta", "fxsparse._version", "fxsparse.errors", "fxsparse.config", "fxsparse.util",
              "fxsparse.ops"}),
    ("passes", {"fxsparse.passes"}),
    ("pipeline", {"fxsparse"}),  # every other top-level module of fxsparse
    ("evaluation and compile", {"fxsparse.robust", "fxsparse.compile"}),
    ("root", {"fxsparse.__init__"}),
    ("tools", {"fxsparse.tools", "fxsparse.testing", "fxsparse.__main__"}),
]


def _modules():
    """{dotted module name: source path} for every module of the installed layout."""
    out = {}
    for path in (ROOT / "fxsparse").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        if "passes" in rel.parts:  # the symlink some checkouts keep; the real folder is below
            continue
        out[".".join(rel.parts)] = path
    for path in (ROOT / "passes").glob("*.py"):
        out["fxsparse.passes." + path.stem] = path
    return out


def _layer(module: str) -> int:
    if module.endswith(".__init__") and module != "fxsparse.__init__":
        module = module[: -len(".__init__")]
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    return best[0]


def _imports(module: str, path: pathlib.Path):
    """Modules of fxsparse that `module` imports anywhere (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    package = module.rsplit(".", 1)[0] if not path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "fxsparse" or name.startswith("fxsparse."):
                found.add(name)
    return found


def _resolve(name: str, modules) -> str:
    """The module a dotted import name refers to ('fxsparse' is the package's __init__)."""
    if name == "fxsparse":
        return "fxsparse.__init__"
    while name and name not in modules:
        if name + ".__init__" in modules:
            return name + ".__init__"
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name or "fxsparse.__init__"


def _graph():
    modules = _modules()
    g = nx.DiGraph()
    for module, path in modules.items():
        g.add_node(module)
        for name in _imports(module, path):
            target = _resolve(name, modules)
            if target != module:
                g.add_edge(module, target)
    return g


def test_imports_have_no_cycle():
    g = _graph()
    cycles = list(nx.simple_cycles(g))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_imports_run_one_way():
    g = _graph()
    upward = [(a, b) for a, b in g.edges if _layer(b) > _layer(a)]
    assert not upward, "imports from a lower layer into a higher one: " + ", ".join(f"{a} -> {b}" for a, b in upward)


def test_no_module_below_the_tools_imports_the_package_root():
    g = _graph()
    rooted = [a for a, b in g.edges if b == "fxsparse.__init__" and _layer(a) < _layer("fxsparse.tools")]
    assert not rooted, rooted


def test_graph_meta_keys_are_spelled_in_one_module():
    pattern = re.compile(r"""["']fxsparse_(path|activation_module|shape|inner_shapes|site|capture|shapes|prepare)\w*["']""")
    offenders = [str(p.relative_to(ROOT)) for m, p in _modules().items()
                 if m != "fxsparse._meta" and pattern.search(p.read_text())]
    assert not offenders, offenders


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_they_import(tmp_path):
    """Editable installs hide a package missing from the build: build the wheel, install it alone into a
    folder, and import every module from there."""
    wheel_dir, target, source = tmp_path / "wheel", tmp_path / "site", tmp_path / "source"
    for name in ("fxsparse", "passes"):  # a clean copy: a build/ folder left by earlier builds is not reused
        shutil.copytree(ROOT / name, source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "passes"))  # not the symlink checkouts keep
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheel_dir), str(source)], check=True, capture_output=True)
    (wheel,) = wheel_dir.glob("fxsparse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    expected = {".".join(pathlib.PurePath(n).with_suffix("").parts) for n in names if n.endswith(".py")}
    assert expected == {m.replace(".__init__", ".__init__") for m in _modules()}, sorted(
        set(_modules()) ^ expected)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    modules = sorted(m for m in _modules() if not m.endswith("__main__"))
    script = (f"import importlib, sys; sys.path.insert(0, {str(target)!r}); "
              f"mods = [importlib.import_module(m.replace('.__init__', '')) for m in {modules!r}]; "
              f"bad = [m.__name__ for m in mods if not m.__file__.startswith({str(target)!r})]; "
              "assert not bad, bad; print(len(mods))")
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""}, cwd=str(tmp_path))
    assert int(out.stdout.strip()) == len(modules)


def test_the_environment_is_read_in_config_only():
    """The environment (every FXSPARSE_* variable, and torchrun's) is read by fxsparse/config.py only, at call
    time (timm's layers/config.py style)."""
    reads = re.compile(r"""(environ|getenv)\b""")
    offenders = [m for m, p in _modules().items() if m != "fxsparse.config" and reads.search(p.read_text())]
    assert not offenders, offenders


def test_the_package_top_holds_at_most_12_modules():
    """The stages with satellites are packages; the top keeps the op, errors, meta keys, config and the few
    pipeline modules (issue 22)."""
    top = sorted(p.name for p in (ROOT / "fxsparse").glob("*.py"))
    assert len(top) <= 12, top


def test_no_module_over_500_lines_and_no_function_over_80():
    """Every module of the library, fxsparse and passes (issue 22)."""
    too_long = []
    for module, path in _modules().items():
        source = path.read_text()
        if source.count("\n") > 500:
            too_long.append(f"{module}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                too_long.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long
