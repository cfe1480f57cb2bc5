"""The evaluator and the tuner with compiled calls (settings ``compile`` and ``backend``).

The runs here compile with ``aot_eager`` (``variants.TORCH_COMPILER``): inductor takes seconds per graph on
2 cores, and aot_eager runs the same traced graph bit-identically to the eager DP-T call
(tests/policies/test_graph_call.py), so a compiled run's actions must equal the eager run's exactly.
"""
import contextlib
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bac import graphs
from bac.evaluation import latency as latency_module
from bac.evaluation import variants
from bac.evaluation.provenance import settings_digest
from bac.evaluation.run import run
from bac.evaluation.settings import EvalError
from bac.policies.graph_call import CompiledCall
from bac.policies.policy import DiffusionPolicy

from .test_faults_eval import compose_config, folder, refused  # noqa: F401 (folder: a fixture)


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(variants, "TORCH_COMPILER", "aot_eager")


def recorded_chunks(monkeypatch) -> list[torch.Tensor]:
    """Every chunk the policy (any view of it) samples from now on, in order."""
    chunks = []
    sample = DiffusionPolicy.predict_action_chunk

    def recording(self, *args, **kwargs):
        chunks.append(sample(self, *args, **kwargs))
        return chunks[-1]

    monkeypatch.setattr(DiffusionPolicy, "predict_action_chunk", recording)
    return chunks


def test_wave_sizes_are_every_batch_the_episodes_call_with():
    assert variants.wave_sizes(3, 2) == [1, 2]  # the last wave holds one episode
    assert variants.wave_sizes(4, 2) == [2]
    assert variants.wave_sizes(2, 10) == [2]
    assert variants.wave_sizes(0, 10) == []


def test_whole_compiled_run_gives_the_eager_runs_episodes_and_actions(tiny_checkpoint, tmp_path, monkeypatch,
                                                                      aot_eager):
    """DP-T full and with a uniform plan: the same episodes and bit-identical chunks; the compiled run calls its
    graphs at every batch size of its waves (3 episodes in waves of 2: 2, then 1) and records its build time."""
    # without the capable user's torch.compile(model) rows, whose calls are not the variants' graphs
    settings = ("run_methods=[full,uniform]", "max_episode_steps=12", "latency.capable_user=false")
    chunks = recorded_chunks(monkeypatch)
    eager = run(compose_config("eval", tiny_checkpoint, tmp_path / "eager", *settings))
    eager_chunks, compiled_chunks = list(chunks), chunks
    chunks.clear()
    batches = []
    graph_sample = CompiledCall.sample
    monkeypatch.setattr(CompiledCall, "sample",
                        lambda self, cond, shape, *rest: batches.append(shape[0]) or graph_sample(self, cond, shape,
                                                                                                   *rest))
    compiled = run(compose_config("eval", tiny_checkpoint, tmp_path / "whole", *settings, "compile=whole"))

    assert eager["compile"] == {"mode": "none", "backend": "torch", "batch_sizes": None}
    assert compiled["compile"] == {"mode": "whole", "backend": "torch", "batch_sizes": [1, 2]}
    assert set(batches) == {1, 2} and len(batches) == len(compiled_chunks)  # every call ran as a graph
    assert len(compiled_chunks) == len(eager_chunks) > 0
    assert all(torch.equal(a, b) for a, b in zip(compiled_chunks, eager_chunks))
    for name in ("full", "uniform"):
        entry = compiled["methods"][name]
        assert entry["success"] == eager["methods"][name]["success"]
        assert entry["graph_build_seconds"] > 0 and "graph_build_seconds" not in eager["methods"][name]
    assert compiled["methods"]["uniform"]["skipped_share"] > 0


@pytest.mark.parametrize("overrides, message", [
    (["methods=all", "run_methods=[full,fbcache]", "compile=whole"],
     "method 'fbcache' caches with the runtime rule 'fbcache'.*compile=whole"),
    (["backend=onnxruntime"], "backend=onnxruntime .* needs compile=whole, got compile=none"),
    (["backend=onnxruntime", "compile=blocks"], "needs compile=whole, got compile=blocks"),
    (["compile=graph"], r"compile must be one of \('none', 'blocks', 'whole'\), got 'graph'"),
    (["compile=whole", "backend=tensorrt"], "backend must be one of .* got 'tensorrt'"),
])
def test_compile_settings_that_cannot_run_are_refused_before_any_work(tiny_checkpoint, folder, overrides,
                                                                      message):
    refused(run, compose_config("eval", tiny_checkpoint, folder, *overrides), folder, EvalError, message)


def test_compiled_blocks_are_refused_for_other_architectures(tmp_path):
    with pytest.raises(EvalError, match="compile=blocks compiles DP-T's branches.*the dit policy has none"):
        run(compose_config("eval", "untrained:dit", tmp_path, "compile=blocks"))
    assert not (tmp_path / "out").exists()


def test_compiled_blocks_are_undone_when_the_variant_is_done(tiny_checkpoint):
    policy = DiffusionPolicy.load(tiny_checkpoint)
    eager = [layer.branches for layer in policy.model.decoder.layers]
    full = variants.Variant("full", "ddim", 4)
    with variants.applied(policy, full, None, variants.Compilation("blocks")) as (view, _):
        assert all(layer.branches is not branches for layer, branches in zip(view.model.decoder.layers, eager))
    assert [layer.branches for layer in policy.model.decoder.layers] == eager


def test_the_default_digest_is_the_one_before_the_settings_existed(tiny_checkpoint, tmp_path):
    default = compose_config("eval", tiny_checkpoint, tmp_path, "out_dir=auto")
    before = OmegaConf.masked_copy(default, [k for k in default if k not in ("compile", "backend")])
    assert settings_digest(default) == settings_digest(before)
    whole = settings_digest(compose_config("eval", tiny_checkpoint, tmp_path, "out_dir=auto", "compile=whole"))
    exported = settings_digest(compose_config("eval", tiny_checkpoint, tmp_path, "out_dir=auto", "compile=whole",
                                              "backend=onnxruntime"))
    assert len({settings_digest(default), whole, exported}) == 3


def test_the_tuner_times_the_compiled_calls_it_will_deploy(tiny_checkpoint, tmp_path, monkeypatch, aot_eager):
    """compile=whole: every timed call is a candidate's compiled view, built before its first timed call."""
    from bac.evaluation.tune import tune

    timed = []  # (candidate, view, graphs built when its block started)
    applied = latency_module.applied

    @contextlib.contextmanager
    def watched(policy, variant, method, compilation=None):
        with applied(policy, variant, method, compilation) as (view, handle):
            built = dict(view.graph.graphs) if view.graph is not None else None
            yield view, handle
            timed.append((variant.name, view, built))

    monkeypatch.setattr(latency_module, "applied", watched)
    result = tune(compose_config("tune", tiny_checkpoint, tmp_path, "run_methods=[full,uniform]", "tasks=[reach]",
                                 "max_episode_steps=12", "compile=whole"))
    assert result["compile"]["mode"] == "whole" and set(result["candidates"]) == {"full", "uniform"}
    repeats = 3  # latency.repeats, after one warm-up block per candidate
    assert len(timed) == 2 * (repeats + 1)
    for name in result["candidates"]:
        views = {id(view) for candidate, view, _ in timed if candidate == name}
        assert len(views) == 1  # one compiled view per candidate, built once
        for candidate, view, built in (t for t in timed if t[0] == name):
            assert isinstance(view.graph, CompiledCall) and view.graph.backend == "aot_eager"
            assert built == view.graph.graphs and len(built) == 2  # batch 1 and the wave of 2: none built later
    uniform = next(view for candidate, view, _ in timed if candidate == "uniform")
    assert uniform.graph.plan is not None  # the candidate's plan, baked into its graphs


def test_resuming_an_eager_run_compiled_is_refused_naming_the_setting(tiny_checkpoint, tmp_path):
    """Also a run recorded before the setting existed (its run.json has no compile): it ran eagerly."""
    out = tmp_path / "recorded"
    out.mkdir()
    eager = compose_config("eval", tiny_checkpoint, tmp_path, f"out_dir={out}")
    config = OmegaConf.to_container(eager, resolve=True)
    del config["compile"], config["backend"]
    (out / "run.json").write_text(json.dumps({"digest": settings_digest(eager), "config": config}))
    with pytest.raises(EvalError, match="holds a run with other settings \\(compile='none' there, 'whole' now\\)"):
        run(compose_config("eval", tiny_checkpoint, tmp_path, f"out_dir={out}", "compile=whole"))


def test_report_times_the_capable_users_configuration(tiny_checkpoint, tmp_path):
    """Every uncached method is also timed under torch.compile(model) in the same rotation; the baseline is the
    fewest-steps uncached method within the tolerance (the verdict over the uncached methods), and every method
    is compared with it; the policy's own denoiser is never left compiled."""
    timed_views = []
    view = latency_module.capable_user_view

    def recording(policy, method):
        timed_views.append(view(policy, method))
        return timed_views[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(latency_module, "capable_user_view", recording)
        report = run(compose_config("eval", tiny_checkpoint, tmp_path, "run_methods=[full,ddim,bac]"))
    capable = report["capable_user"]
    uncached = [name for name, m in report["methods"].items() if m["config"]["cache"] is None]
    assert sorted(capable["compiled"]) == sorted(uncached) == ["ddim", "full"]
    assert len(timed_views) == 2 and all(isinstance(v.model, torch._dynamo.eval_frame.OptimizedModule)
                                         for v in timed_views)
    # the verdict over the uncached methods only: the reference, or ddim where it is within the tolerance
    within = report["methods"]["ddim"]["paired_vs_full"]["mean"] >= -0.02 - 1e-12
    faster = report["methods"]["ddim"]["speedup"] > 1
    assert capable["method"] == ("ddim" if within and faster else "full")
    assert capable["compiled"][capable["method"]]["repeats"] == 3  # latency.repeats, interleaved with the methods
    base = capable["latency"]["p50_ms"]
    for m in report["methods"].values():
        assert m["vs_capable_user"] == pytest.approx(base / m["latency"]["p50_ms"])
    text = (Path(report["out_dir"]) / "report.md").read_text()
    assert "vs capable user" in text and f"torch.compile(model), {capable['method']}" in text
    policy = DiffusionPolicy.load(tiny_checkpoint)
    assert not isinstance(policy.model, torch._dynamo.eval_frame.OptimizedModule)


def test_without_a_cpp_compiler_torch_compile_is_refused_or_said(tiny_checkpoint, tmp_path, monkeypatch):
    """inductor needs a C++ compiler for CPU kernels: compile=whole/blocks with backend=torch is refused before
    any work, and the default run says in its report that the capable user's configuration was not timed."""
    monkeypatch.setattr(variants, "TORCH_COMPILER", "inductor")
    monkeypatch.setattr(graphs, "inductor_compiler", lambda: None)
    for mode in ("whole", "blocks"):
        with pytest.raises(EvalError, match="C\\+\\+ compiler"):
            run(compose_config("eval", tiny_checkpoint, tmp_path / mode, f"compile={mode}"))
    report = run(compose_config("eval", tiny_checkpoint, tmp_path / "default", "run_methods=[full,uniform]"))
    assert report["capable_user"] is None and "C++ compiler" in report["capable_user_not_timed"]
    assert "was not timed" in (Path(report["out_dir"]) / "report.md").read_text()
    assert variants.torch_compile_unavailable("cuda") is None  # CUDA kernels are Triton's, not the C++ compiler's


def test_the_main_job_imports_without_the_serve_extra():
    """README's main job installs the eval extra only: nothing the evaluator imports may need msgpack or
    websockets (the serve extra), the compile settings included."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['msgpack'] = None; sys.modules['websockets'] = None; "
            "import bac.evaluation.run, bac.evaluation.tune, bac.apps.eval")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
