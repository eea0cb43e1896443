"""The code's structure, checked: the layers of ``sweep/`` (config <- planning <- execution,
config <- tracking <- analysis; no Ray outside execution; the benchmarks for the CLI alone), no
import cycle, no private name imported from another package, private APIs of Ray, MLflow and
Optuna only behind ``sweep/execution/_compat.py``, no test hook in production code, and no file
that points to documents outside the repository.

Every rule's checker runs on the repository and, as its negative control, on a small module tree
in ``tmp_path`` that breaks the rule, where it must report the violation."""
import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ("sweep", "trainables", "search_spaces")

# which layers of ``sweep`` each layer may import; a layer is a sub-package, ``errors`` (what
# every layer raises), ``api`` (the package's own ``__init__``: the public functions) or ``cli``
LAYERS = {
    "errors": set(),
    "config": {"errors"},
    "planning": {"errors", "config"},
    "tracking": {"errors", "config"},
    "analysis": {"errors", "config", "tracking"},
    "execution": {"errors", "config", "planning", "tracking", "analysis"},
    "api": {"errors", "config", "planning", "execution", "analysis"},
    "bench": {"errors", "config", "planning", "tracking", "analysis", "execution", "api"},
    "cli": {"errors", "config", "planning", "tracking", "analysis", "execution", "api", "bench"},
}
NO_RAY = ("config", "planning", "tracking", "analysis")


# ----------------------------------------------------------------------------- the checkers

def _modules(root: Path, package: str) -> dict[str, ast.Module]:
    return {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): ast.parse(p.read_text())
            for p in (root / package).rglob("*.py")}


def _is_module(root: Path, name: str) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _import_names(root: Path, tree: ast.Module) -> list[tuple[str, str | None]]:
    """(module, name imported from it or None) of every import in a file, at the top or inside
    functions; ``from a import b`` where ``a.b`` is a module counts as ``(a.b, None)``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub, None) if _is_module(root, sub) else (node.module, a.name))
    return out


def _imports(root: Path, tree: ast.Module) -> set[str]:
    return {m for m, _ in _import_names(root, tree)}


def _graph(root: Path, *packages: str) -> tuple[dict, dict[str, set[str]]]:
    """The packages' modules and their imports of each other; the top package's own ``__init__``
    (which every submodule import runs anyway) is left out as a target."""
    mods = {n: t for p in packages for n, t in _modules(root, p).items()}
    return mods, {name: {m for m in _imports(root, tree) if m in mods and m not in (name, *packages)}
                  for name, tree in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "sweep":
        return None
    if len(parts) == 1:
        return "api"
    return "cli" if parts[1] in ("cli", "__main__") else parts[1]


def layering_violations(root: Path) -> list[str]:
    """Imports of ``sweep`` modules across layers that ``LAYERS`` does not allow (the bench among
    them: only the CLI imports it)."""
    out = []
    for name, tree in _modules(root, "sweep").items():
        mine = _layer(name)
        for target in sorted(_imports(root, tree)):
            theirs = _layer(target)
            if theirs is None or theirs == mine:
                continue
            if mine not in LAYERS or theirs not in LAYERS or theirs not in LAYERS[mine]:
                out.append(f"{name} ({mine}) imports {target} ({theirs})")
    return out


def ray_users(root: Path) -> list[str]:
    """The modules of the layers in ``NO_RAY`` that import Ray, themselves or through any module
    of ``sweep`` or ``trainables`` they import (at the top or inside a function)."""
    mods, graph = _graph(root, "sweep", "trainables")
    out = []
    for start in sorted(m for m in mods if _layer(m) in NO_RAY):
        seen, todo = set(), [start]
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += graph[n]
        users = sorted(m for m in seen if any(i == "ray" or i.startswith("ray.") for i in _imports(root, mods[m])))
        if users:
            out.append(f"{start} reaches Ray through {users}")
    return out


def _package(module: str, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def private_imports(root: Path) -> list[str]:
    """Private modules or names (``_x``) of ``sweep`` or ``trainables`` that a module of ``sweep``
    imports from another package than its own."""
    out = []
    for path in (root / "sweep").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        mine = _package(name, path.name == "__init__.py")
        for module, imported in _import_names(root, ast.parse(path.read_text())):
            if module.split(".")[0] not in ("sweep", "trainables"):
                continue
            target = f"{module}.{imported}" if imported else module
            private = [i for i, p in enumerate(target.split(".")) if p.startswith("_") and not p.startswith("__")]
            if not private:
                continue
            owner = ".".join(target.split(".")[:private[0]])      # the package the private part belongs to
            if owner != mine:
                out.append(f"{name} imports {target}")
    return out


# ----------------------------------------------------------------------------- the repository

def test_the_import_graph_of_sweep_has_no_cycle():
    _, graph = _graph(ROOT, "sweep")
    assert len(graph) > 30
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_layers_import_only_the_layers_below_them():
    assert {p.name for p in (ROOT / "sweep").iterdir() if (p / "__init__.py").is_file()} == set(LAYERS) - {
        "errors", "api", "cli"}
    assert layering_violations(ROOT) == []


def test_no_ray_in_config_planning_tracking_and_analysis():
    assert ray_users(ROOT) == []


def test_no_private_name_is_imported_from_another_package():
    assert private_imports(ROOT) == []


def test_each_sub_package_says_what_it_is_and_exports_its_public_names():
    for init in (ROOT / "sweep").glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        doc = ast.get_docstring(tree, clean=False)
        assert doc and len(doc.strip().splitlines()) == 3, f"{init}: a docstring of three lines"
        exported = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "__all__")
        names = [e.value for e in exported.elts]
        assert names and not [n for n in names if n.startswith("_")], init
        defined = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names} \
            | {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert set(names) <= defined, f"{init}: __all__ names what it does not define"


def test_private_apis_of_ray_mlflow_and_optuna_only_in_compat():
    found = []
    for package in ("sweep", "trainables"):
        for name, tree in _modules(ROOT, package).items():
            if name == "sweep.execution._compat":
                continue
            for m in _imports(ROOT, tree):
                parts = m.split(".")
                if parts[0] in ("ray", "mlflow", "optuna") and any(p.startswith("_") for p in parts):
                    found.append(f"{name}: import {m}")
    assert not found, found


# ----------------------------------------------------------------------------- negative controls

def _tree(root: Path, files: dict[str, str]) -> Path:
    """A module tree of ``files``; every folder in it a package."""
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for folder in [p for p in root.rglob("*") if p.is_dir()]:
        if not (folder / "__init__.py").exists():
            (folder / "__init__.py").write_text("")
    return root


def test_the_cycle_check_finds_a_cycle(tmp_path):
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    root = _tree(tmp_path, {"sweep/config/_a.py": "from sweep.config._b import x\n",
                            "sweep/config/_b.py": "def f():\n    from sweep.config._a import y\n"})
    assert _cycle(_graph(root, "sweep")[1]) == ["sweep.config._a", "sweep.config._b", "sweep.config._a"]


def test_the_layer_check_flags_an_import_against_the_layers(tmp_path):
    root = _tree(tmp_path, {
        "sweep/config/_a.py": "from sweep.planning import plan\n",              # config above planning
        "sweep/analysis/_a.py": "def f():\n    from sweep.execution import run\n",   # analysis runs nothing
        "sweep/planning/_a.py": "from sweep.bench import main\n",               # the bench: the CLI's
        "sweep/tracking/_a.py": "from sweep.config import x\nfrom sweep.errors import E\n",   # allowed
        "sweep/cli.py": "from sweep.bench import main\n",                       # allowed
        "sweep/errors.py": "",
    })
    assert sorted(layering_violations(root)) == [
        "sweep.analysis._a (analysis) imports sweep.execution (execution)",
        "sweep.config._a (config) imports sweep.planning (planning)",
        "sweep.planning._a (planning) imports sweep.bench (bench)"]


def test_the_ray_check_flags_ray_reached_directly_or_through_another_module(tmp_path):
    root = _tree(tmp_path, {
        "sweep/planning/_a.py": "def f():\n    import ray\n",
        "sweep/analysis/_b.py": "from trainables.worker import run\n",
        "trainables/worker.py": "from ray import tune\n",
        "sweep/execution/_c.py": "import ray\n",                               # execution may
    })
    assert ray_users(root) == ["sweep.analysis._b reaches Ray through ['trainables.worker']",
                               "sweep.planning._a reaches Ray through ['sweep.planning._a']"]


def test_the_private_import_check_flags_a_private_name_of_another_package(tmp_path):
    root = _tree(tmp_path, {
        "sweep/cli.py": "from trainables.stages import _build\n",
        "sweep/analysis/_a.py": "from sweep.tracking._b import Tracker\nfrom sweep.analysis._c import x\n",
        "sweep/tracking/_b.py": "",
        "sweep/analysis/_c.py": "",
        "sweep/execution/__init__.py": "from sweep.execution._d import run\n",
        "sweep/execution/_d.py": "",
        "trainables/stages.py": "",
    })
    assert sorted(private_imports(root)) == ["sweep.analysis._a imports sweep.tracking._b.Tracker",
                                             "sweep.cli imports trainables.stages._build"]


# ----------------------------------------------------------------------------- the repository's files

def _tracked_text_files():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in files if Path(f).suffix in (".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt", "")
            and (ROOT / f).is_file() and Path(f).name != Path(__file__).name]


def test_no_file_points_to_documents_outside_the_repository():
    outside = re.compile(r"SPEC\.md|DESIGN\.md|papers/0\d\d|\.\./shared")
    hits = []
    for path in _tracked_text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(text.splitlines(), 1) if outside.search(line)]
    assert not hits, hits


def test_production_code_reads_no_test_hook():
    for package in PRODUCTION:
        for path in (ROOT / package).rglob("*.py"):
            assert "SWEEP_TEST" not in path.read_text(), path
