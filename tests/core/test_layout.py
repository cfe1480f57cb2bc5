"""The tree's shape: layers one-way over the whole installed tree, no import cycle, a light core install.

Layers, bottom up (pyproject.toml's install mapping applied, function-local imports counted):
core ``bac`` (torch, numpy, safetensors) <- configs ``bac.configs`` <- ``bac.policies`` | ``bac.envs``
(siblings that do not import each other) <- ``bac.runtime`` <- ``bac.evaluation`` <- entry points
``bac.apps`` (and the aliases ``bac.eval``, ``bac.tune``). ``benchmarks/`` sits
on top and is not installed: nothing installed imports it.
"""
import ast
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import bac
from bac.methods import registry

ROOT = Path(bac.__file__).resolve().parent.parent
BAC_DIR = ROOT / "bac"
LAYERS = {"bac": 0, "bac.configs": 1, "bac.policies": 2, "bac.envs": 2, "bac.runtime": 3, "bac.evaluation": 4,
          "bac.apps": 5}
ENTRY_ALIASES = {"bac.eval", "bac.tune"}  # `python -m` names of commands in bac.apps
ENTRY_LAYER = LAYERS["bac.apps"]


def installed_modules(root: Path) -> dict[str, Path]:
    """Every installed module's name and file, from pyproject.toml's packages and package-dir."""
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    modules = {}
    for package, folder in setup["package-dir"].items():
        for path in (root / folder).rglob("*.py"):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if name.rsplit(".", 1)[0] in setup["packages"] or name in setup["packages"]:
                modules.setdefault(name, path)
    return modules


def imports_of(name: str, path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions, relative imports resolved."""
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


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports (``benchmarks.*`` kept, to refuse it)."""
    modules = installed_modules(root)
    graph = {}
    for name, path in modules.items():
        targets = set()
        for target in imports_of(name, path):
            parts = target.split(".")
            # importing a.b.c runs a/__init__ and a/b/__init__ first
            targets.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        graph[name] = {t for t in targets if (t in modules or t.split(".")[0] == "benchmarks") and t != name}
    return graph


def room(module: str) -> str:
    """The layer's package a module belongs to (``bac.policies.train`` -> ``bac.policies``)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if ".".join(parts[:2]) in LAYERS else "bac"


def layer(module: str) -> int:
    return ENTRY_LAYER if module in ENTRY_ALIASES else LAYERS[room(module)]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
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


def layer_violations(root: Path) -> list[str]:
    """Upward, sideways (policies <-> envs) and out-of-package (benchmarks) imports, and module cycles."""
    graph = import_graph(root)
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if target.split(".")[0] == "benchmarks":
                found.append(f"{module} -> {target} (benchmarks/ is not installed)")
            elif module.startswith(target + "."):
                continue
            elif layer(target) > layer(module):
                found.append(f"{module} -> {target} (upward)")
            elif layer(target) == layer(module) and room(target) != room(module) and module not in ENTRY_ALIASES:
                found.append(f"{module} -> {target} (sideways)")
    if cycle := find_cycle(graph):
        found.append("cycle: " + " -> ".join(cycle))
    return found


def test_the_graph_walker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_whole_tree_keeps_its_layers():
    graph = import_graph(ROOT)
    # the walker sees real edges, through the install mapping and inside functions
    assert {"bac.methods", "bac.plan", "bac.rows"} <= graph["bac.engine"]
    assert {"bac.runtime", "bac.envs.metaworld_env", "bac.policies.train"} <= graph["bac.apps.train"]
    assert {"bac.evaluation", "bac.runtime", "bac.policies", "bac.envs"} <= {room(m) for m in graph}
    assert layer_violations(ROOT) == []


def planted_tree(tmp_path: Path) -> Path:
    """A copy of the installed tree's sources (and pyproject.toml) to plant bad imports in."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for folder in set(setup["package-dir"].values()):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("checkpoints", "__pycache__"))
    return tmp_path


def test_a_planted_upward_import_is_refused(tmp_path):
    tree = planted_tree(tmp_path)
    (tree / "runtime" / "planted.py").write_text("def report():\n    from bac.evaluation.report import wilson\n")
    assert layer_violations(tree) == ["bac.runtime.planted -> bac.evaluation (upward)",
                                      "bac.runtime.planted -> bac.evaluation.report (upward)"]


def test_a_planted_cycle_and_a_sideways_import_are_refused(tmp_path):
    tree = planted_tree(tmp_path)
    (tree / "policies" / "planted.py").write_text("from bac.envs import dataset\n")
    (tree / "bac" / "planted_a.py").write_text("from bac import planted_b\n")
    (tree / "bac" / "planted_b.py").write_text("def f():\n    from bac.planted_a import f\n")
    found = layer_violations(tree)
    assert "bac.policies.planted -> bac.envs (sideways)" in found
    assert "cycle: bac.planted_a -> bac.planted_b -> bac.planted_a" in found


def test_nothing_installed_imports_the_benchmarks(tmp_path):
    tree = planted_tree(tmp_path)
    (tree / "eval" / "planted.py").write_text("import benchmarks.bench_core\n")
    assert "bac.evaluation.planted -> benchmarks (benchmarks/ is not installed)" in layer_violations(tree)


def test_the_core_imports_nothing_from_the_robot_side():
    offenders = {m: sorted(t for t in targets if layer(t) > 0) for m, targets in import_graph(ROOT).items()
                 if room(m) == "bac" and m not in ENTRY_ALIASES}
    assert not {m: t for m, t in offenders.items() if t}, f"bac/ modules importing the robot side: {offenders}"


def test_the_core_works_without_diffusers_hydra_or_omegaconf():
    """A core-only install (torch, numpy, safetensors): import bac and accelerate a model with those packages
    made unimportable."""
    code = textwrap.dedent("""
        import sys
        class Missing:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"diffusers", "transformers", "hydra", "omegaconf", "gymnasium", "scipy"}:
                    raise ModuleNotFoundError(f"No module named {name!r}")
        sys.meta_path.insert(0, Missing())
        import torch, bac
        from torch import nn
        class Layer(nn.Module):
            def __init__(self):
                super().__init__()
                self.norm1, self.attn = nn.LayerNorm(8), nn.Linear(8, 8)
                self.norm2, self.ff = nn.LayerNorm(8), nn.Linear(8, 8)
            def forward(self, h):
                h = h + self.attn(self.norm1(h))
                return h + self.ff(self.norm2(h))
        bac.register_adapter(Layer, bac.BranchAttributes({"attn": "sa", "ff": "ffn"}))
        model = nn.Sequential(Layer(), Layer())
        handle = bac.accelerate(model, bac.build_method("uniform", model, num_steps=6, interval=2), num_steps=6)
        handle.new_trajectory()
        for step in range(6):
            model(torch.randn(1, 8))
        assert not {"diffusers", "hydra", "omegaconf"} & set(sys.modules)
        for extra in ("bac.diffusers", "bac.sampling"):
            try:
                __import__(extra)
                raise SystemExit(extra + " imported without diffusers")
            except ModuleNotFoundError as err:
                assert "pip install 'bac[diffusers]'" in str(err), err
        print(handle.stats()["skipped"] == 12)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stdout + out.stderr


def test_import_bac_loads_no_simulator_training_or_plotting_package():
    code = textwrap.dedent("""
        import sys, bac, bac.diffusers
        heavy = {"mujoco", "metaworld", "hydra", "omegaconf", "gymnasium", "matplotlib", "h5py", "sklearn"}
        print(sorted(heavy & {m.split(".")[0] for m in sys.modules}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_policy_client_loads_neither_a_model_library_nor_the_simulator():
    """A robot's client of the policy server needs the runtime's protocol, not diffusers or MuJoCo."""
    code = textwrap.dedent("""
        import sys, bac.runtime.client
        heavy = {"diffusers", "transformers", "metaworld", "mujoco", "hydra", "matplotlib"}
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
