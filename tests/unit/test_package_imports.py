"""The layout's dependency rules (DESIGN.md), read from the code: every product module's imports
(module level and inside functions) parsed with `ast`. No cycle between top-level packages;
models/ imports no other product package; modstream/ (the contract) imports no role at module
level; trainer/ never imports stream/ or review/; nothing the worker, the sinks, the lag
exporter or the console run reaches trainer/. And a started `modstream worker`, in a process
where `trainer` cannot be imported at all (as in a worker image without it), runs and has
loaded no `trainer.*` module."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.integration.stack import free_loopback_ports
from tests.integration.worker_harness import register_tiny_model

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("modstream", "models", "trainer", "stream", "review")
ROLES = ("trainer", "stream", "review")
# What the long-running serving roles import; their closure must not reach trainer/.
# (stream.commands also holds `demo` and `run`, which train a default model on purpose: the
# worker command's own path is checked by starting it, below.)
SERVING_ROOTS = (
    "stream.worker",
    "stream.lag_exporter",
    "review.console",
    "review.console_cli",
    "review.review_sink",
    "review.dataset_sink",
    "review.sinks_cli",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported product module, at module level?) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                found.append((name, id(node) in top_level))
    return found


def product_modules() -> dict[str, list[tuple[str, bool]]]:
    return {module_name(p): imports_of(p) for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = product_modules()


def package_graph(module_level_only: bool = False) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {pkg: set() for pkg in PACKAGES}
    for module, imported in MODULES.items():
        for name, top in imported:
            if module_level_only and not top:
                continue
            source, target = module.split(".")[0], name.split(".")[0]
            if source != target:
                graph[source].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        for nxt in sorted(graph[node]):
            cycle = visit(nxt, [*path, node])
            if cycle:
                return cycle
        return None

    for start in graph:
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_top_level_packages() -> None:
    assert find_cycle(package_graph()) is None, package_graph()


def test_models_imports_no_other_product_package() -> None:
    assert package_graph()["models"] == set()


def test_the_contract_imports_no_role_at_module_level() -> None:
    assert package_graph(module_level_only=True)["modstream"] & set(ROLES) == set()


def test_product_code_never_imports_bench_or_studies() -> None:
    offenders = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [
                    f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("bench", "studies")
                ]
    assert offenders == []


def test_trainer_never_imports_stream_or_review() -> None:
    assert package_graph()["trainer"] & {"stream", "review"} == set()


def _resolve(name: str) -> str | None:
    """`pkg.mod.Name` -> `pkg.mod` (the product module an import names), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_what_the_serving_roles_run_never_reaches_the_trainer() -> None:
    for root in SERVING_ROOTS:
        assert root in MODULES, root
        seen, todo = {root}, [root]
        via: dict[str, str] = {}
        while todo:
            module = todo.pop()
            for name, _ in MODULES[module]:
                target = _resolve(name)
                if target is not None and target not in seen:
                    seen.add(target)
                    via[target] = module
                    todo.append(target)
        reached = sorted(m for m in seen if m.split(".")[0] == "trainer")
        chains = {m: via[m] for m in reached}
        assert reached == [], f"{root} reaches training code: {chains}"


def test_a_started_worker_loads_no_trainer_module_even_where_trainer_cannot_be_imported(tmp_path: Path) -> None:
    """`modstream worker` against a closed broker port, in a process where importing `trainer`
    fails (as in an image without it): it gets as far as bootstrapping Kafka, which fails, and
    its loaded modules are dumped at exit: stream.worker yes, trainer.* none. (The integration
    suite runs every worker this way against the real broker: tests/integration/no_trainer.py.)"""
    register_tiny_model(tmp_path / "registry")
    closed, web = free_loopback_ports(2)
    out = tmp_path / "modules.json"
    code = f"""
import atexit, json, sys
sys.path.insert(0, {str(ROOT / "tests" / "integration")!r})
import no_trainer
no_trainer.install()

def dump():
    with open({str(out)!r}, "w") as fh:
        json.dump(sorted(sys.modules), fh)

atexit.register(dump)
from modstream.cli import main
main(["worker", "--bootstrap", "127.0.0.1:{closed}", "--redis", "", "--registry", {str(tmp_path / "registry")!r},
      "--web-port", "{web}", "--device", "cpu"])
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.exists(), f"no module dump ({done.returncode}):\n{done.stderr[-3000:]}"
    assert "Unable to bootstrap" in done.stderr, done.stderr[-3000:]  # it got as far as Kafka
    assert "not in the worker image" not in done.stderr, done.stderr[-3000:]
    loaded = json.loads(out.read_text())
    assert "stream.worker" in loaded and "stream.pipeline" in loaded and "models.registry" in loaded
    assert [m for m in loaded if m == "trainer" or m.startswith("trainer.")] == []
