"""The core's shape: no import cycle inside bac/, nothing imported from the robot side, a light install."""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bac
from bac.methods import registry

BAC_DIR = Path(bac.__file__).resolve().parent
ROBOT_SIDE = ("bac.policies", "bac.envs", "bac.evaluation", "bac.runtime", "bac.configs", "policies", "envs", "eval")
ENTRY_POINTS = {"bac.eval", "bac.tune"}  # the thin entry points of the main job and the tuner may reach the robot side


def module_name(path: Path) -> str:
    parts = path.relative_to(BAC_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import x` imports module x
    return found


def core_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in BAC_DIR.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for target in imports_of(path):
            parts = target.split(".")
            # importing a.b.c runs a/__init__ and a/b/__init__ first
            targets.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            # importing a package runs its __init__, so a module importing its own package is not an edge back
            if node.startswith(target + "."):
                continue
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_walker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_has_no_import_cycle():
    graph = core_graph()
    assert {"bac.methods", "bac.plan", "bac.actions"} <= graph["bac.engine"]  # the walker sees real edges
    assert find_cycle(graph) is None, f"import cycle in bac/: {' -> '.join(find_cycle(graph))}"


def test_the_core_imports_nothing_from_the_robot_side():
    offenders = {}
    for path in BAC_DIR.rglob("*.py"):
        name = module_name(path)
        if name in ENTRY_POINTS:
            continue
        bad = sorted(t for t in imports_of(path) if t.split(".")[0] in ("policies", "envs", "eval")
                     or any(t == r or t.startswith(r + ".") for r in ROBOT_SIDE))
        if bad:
            offenders[name] = bad
    assert not offenders, f"bac/ modules importing the robot side: {offenders}"


def test_import_bac_loads_no_simulator_training_or_plotting_package():
    code = textwrap.dedent("""
        import sys, bac, bac.diffusers
        heavy = {"mujoco", "metaworld", "hydra", "omegaconf", "gymnasium", "matplotlib", "h5py", "sklearn"}
        print(sorted(heavy & {m.split(".")[0] for m in sys.modules}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_version_is_the_package_version():
    from importlib import metadata

    assert bac.__version__ == metadata.version("bac")


# --- one registry -----------------------------------------------------------------------


def test_every_method_is_in_one_registry_with_typed_parameters():
    import dataclasses

    names = bac.available_methods()
    assert {"bac", "acs", "unified-acs", "uniform", "every-step", "taylorseer", "fbcache", "cg-taylor",
            "sortblock"} <= set(names)
    for name in names:
        info = bac.method_info(name)
        assert dataclasses.is_dataclass(info.params) and info.name == name
        assert isinstance(info.needs_calibration, bool) and isinstance(info.static, bool) and info.summary
    assert bac.method_params("bac", M=7).M == 7 and bac.method_params("bac").n == 5
    with pytest.raises(ValueError, match="takes parameters"):
        bac.method_params("bac", budget=3)
    with pytest.raises(ValueError, match="M"):
        bac.method_params("bac", M=2.7)
    with pytest.raises(ValueError, match="unknown caching method"):
        bac.method_info("no-such-method")


NEW_METHOD = '''
from dataclasses import dataclass

import bac


@dataclass(frozen=True)
class EveryOtherParams:
    offset: int = 1

    def __post_init__(self):
        if self.offset not in (0, 1):
            raise ValueError("offset must be 0 or 1")


@bac.register_method("every-other", EveryOtherParams)
def every_other(params, spec, num_steps, calibration):
    """Every block at step 0 and every other step after it."""
    steps = sorted({0} | set(range(params.offset, num_steps, 2)))
    return {b.name: steps for b in spec.blocks}, None
'''


def test_a_new_method_is_one_file(tmp_path, monkeypatch, tiny_stack, sample_actions):
    import importlib.util

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # the registration ends with the test
    path = tmp_path / "every_other.py"
    path.write_text(NEW_METHOD)
    spec = importlib.util.spec_from_file_location("every_other", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))

    model, scheduler, obs = tiny_stack
    assert "every-other" in bac.available_methods() and not bac.needs_calibration("every-other")
    method = bac.build_method("every-other", model, num_steps=12, offset=0)
    assert method.schedule.update_steps()[method.schedule.blocks[0].name] == [0, 2, 4, 6, 8, 10]
    with bac.accelerate(model, method, num_steps=12) as handle:
        sample_actions(model, scheduler, obs)
        assert handle.stats()["skipped_share"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="offset"):
        bac.build_method("every-other", model, num_steps=12, offset=3)
    with pytest.raises(ValueError, match="already registered"):
        bac.register_method("every-other", registry.method_info("every-other").params)(lambda *a: None)


def test_every_package_is_installed():
    """A wheel holds only the packages pyproject.toml lists (the robot side is mapped from its own folders)."""
    import tomllib

    root = BAC_DIR.parent
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, folders = set(setup["packages"]), setup["package-dir"]
    for package, folder in folders.items():
        for init in (root / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(root / folder).parts
            if "checkpoints" in relative or "results" in relative:
                continue
            name = ".".join([package, *relative])
            assert name in listed, f"{init.parent} is not installed: add {name!r} to pyproject.toml's packages"
