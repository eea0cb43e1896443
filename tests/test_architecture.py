"""The code's structure, checked: no import cycle in ``sweep/``, private APIs of Ray, MLflow and
Optuna only behind ``sweep/compat.py``, no test hook in production code, and no file that points
to documents outside the repository."""
import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ("sweep", "trainables", "search_spaces")


def _modules(package: str) -> dict[str, ast.Module]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): ast.parse(p.read_text())
            for p in (ROOT / package).rglob("*.py")}


def _imports(tree: ast.Module) -> set[str]:
    """Every module a file imports, at the top or inside functions (``from a import b`` counts
    as ``a.b`` where that is a module, else as ``a``)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if _is_module(sub) else node.module)
    return out


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph(package: str) -> tuple[dict, dict[str, set[str]]]:
    """The package's modules and their imports of each other; the package's own ``__init__``
    (which every submodule import runs anyway) is left out as a target."""
    mods = _modules(package)
    return mods, {name: {m for m in _imports(tree) if m in mods and m not in (name, package)}
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


def test_the_import_graph_of_sweep_has_no_cycle():
    _, graph = _graph("sweep")
    assert len(graph) > 15
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_selection_and_report_do_not_need_ray():
    mods, graph = _graph("sweep")
    for start in ("sweep.selection", "sweep.report", "sweep.preset", "sweep.estimate"):
        seen, todo = set(), [start]
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += graph[n]
        users = [m for m in seen if any(i == "ray" or i.startswith("ray.") for i in _imports(mods[m]))]
        assert not users, f"{start} reaches Ray through {users}"


def test_private_apis_of_ray_mlflow_and_optuna_only_in_compat():
    found = []
    for package in ("sweep", "trainables"):
        for name, tree in _modules(package).items():
            if name == "sweep.compat":
                continue
            for m in _imports(tree):
                parts = m.split(".")
                if parts[0] in ("ray", "mlflow", "optuna") and any(p.startswith("_") for p in parts):
                    found.append(f"{name}: import {m}")
    assert not found, found


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
