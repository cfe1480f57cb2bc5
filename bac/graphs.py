"""One sampling call as one graph: traced once with a static plan baked in, then compiled or exported.

A static plan decides nothing at run time: which blocks run at which step is known before the call. So a
whole sampling call (the denoising steps unrolled, each step's row a constant, the sampler's coefficients
constants) is traced once with ``torch.export`` (non-strict: the engine's Python runs at trace time and
leaves only tensor operations; skipped blocks are not in the graph and reused values are graph values),
with the noise as an input so results stay seeded. :class:`GraphCall` then runs it as one
``torch.compile(fullgraph=True)`` graph (``mode="reduce-overhead"``: CUDA graphs on a GPU) or as an ONNX
model in ONNX Runtime. A runtime rule reads tensor values on the host and is refused.

The caller (a policy, :mod:`bac.policies.graph_call`) writes the call as a module of tensors only. How it
works and what it costs: docs/guide/graphs.md.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .files import write_atomic
from .state import get_handle

#: The ``compile`` setting of the evaluator, the tuner and the server: eager, DP-T's branches compiled
#: (``compile_blocks``), or each sampling call as one graph (this module).
COMPILE_MODES = ("none", "blocks", "whole")
#: Their ``backend`` setting: what runs a compiled call, torch.compile or ONNX Runtime (whole calls only).
SETTING_BACKENDS = ("torch", "onnxruntime")
#: How a traced call runs: torch.compile backends, or ONNX Runtime.
TORCH_BACKENDS = ("inductor", "aot_eager", "eager")
BACKENDS = TORCH_BACKENDS + ("onnxruntime",)
#: torch.compile modes that replay CUDA graphs on a GPU (their output is overwritten by the next replay).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
#: The ONNX metadata key a traced call's description is kept under.
METADATA_KEY = "bac"


def inductor_compiler() -> str | None:
    """The C++ compiler ``torch.compile``'s inductor builds CPU kernels with (``$CXX``, else g++, c++ or
    clang++ on the PATH), or ``None``: without one, inductor fails on the first compiled call."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for path in map(shutil.which, names) if path), None)


def torch_compile_unavailable(device: torch.device | str, backend: str = "inductor") -> str | None:
    """Why ``torch.compile(backend=backend)`` cannot compile for ``device`` on this machine, or ``None``."""
    if backend != "inductor" or str(device).startswith("cuda") or inductor_compiler() is not None:
        return None
    return ("torch.compile's inductor builds CPU kernels with a C++ compiler and none was found (g++, c++, "
            "clang++ or $CXX): install one (e.g. apt install g++)")


def accelerated(module: nn.Module) -> list[Any]:
    """The :class:`bac.CacheHandle` of every accelerated module in ``module``, each once."""
    handles = []
    for sub in module.modules():
        handle = get_handle(sub)
        if handle is not None and handle not in handles:
            handles.append(handle)
    return handles


def trace(module: nn.Module, inputs: Sequence[torch.Tensor], start: int = 0) -> torch.export.ExportedProgram:
    """``module(*inputs)`` traced into one graph (``torch.export``, non-strict, without gradients).

    Every accelerated denoiser in ``module`` must run a static plan (:class:`bac.Plan`); the trace runs in
    a scratch context of its handle (:meth:`bac.CacheHandle.scratch`), so it leaves no cached value and no
    count behind. ``start``: the first denoiser call is that step of the plan (a warm start's segment: the
    plan's rows from there, the first computing every block). Any Python decision ``module`` makes is
    taken at trace time: the graph is only valid for inputs of these shapes, this plan and these weights.
    """
    handles = accelerated(module)
    for handle in handles:
        if not handle.schedule.static:
            raise ConfigError(
                f"a whole-call graph needs a static plan; {type(handle.model).__name__} is accelerated with the "
                f"runtime rule {handle.schedule.name!r}, which decides on the host from tensor values at every "
                "step (use a plan, or run this configuration eagerly)")
    for value in inputs:
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"a traced call takes tensors only, got {type(value).__name__}")
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for handle in handles:
            stack.enter_context(handle.scratch(start=start))
        return torch.export.export(module, tuple(inputs), strict=False)


def _spec(value: torch.Tensor) -> dict:
    return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}


class GraphCall:
    """A traced call made runnable by ``backend`` (:data:`BACKENDS`); calling it checks its inputs.

    ``GraphCall(exported, inputs, backend="inductor", mode=None, threads=None)``: ``exported`` from
    :func:`trace` with the example ``inputs``; the graph is compiled (or exported to ONNX and loaded) and
    run once on ``inputs`` here, so the first real call pays nothing more (``build_seconds`` says what it
    cost). ``mode`` goes to ``torch.compile`` (``"reduce-overhead"``: CUDA graphs; the output is cloned,
    since the next replay overwrites it). ONNX Runtime runs with ``threads`` intra-op threads (default
    torch's), on CUDA where the inputs are and its CUDA provider is installed.
    """

    def __init__(self, exported: torch.export.ExportedProgram, inputs: Sequence[torch.Tensor],
                 backend: str = "inductor", mode: str | None = None, threads: int | None = None,
                 metadata: dict | None = None):
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        if mode is not None and backend == "onnxruntime":
            raise ConfigError(f"mode={mode!r} is a torch.compile option; ONNX Runtime takes none")
        self.backend, self.mode = backend, mode
        self.metadata = dict(metadata or {})
        self.names = [f"input_{i}" for i in range(len(inputs))]
        self.specs = [_spec(value) for value in inputs]
        self.device = inputs[0].device
        started = time.perf_counter()
        if backend == "onnxruntime":
            self.onnx = to_onnx(exported, inputs, self.metadata)
            self._session = _session(self.onnx, self.device, threads)
            self._run = self._run_onnxruntime
        else:
            self.onnx = None
            self._compiled = torch.compile(exported.module(), fullgraph=True, dynamic=False, backend=backend,
                                           mode=mode)
            self._clone = mode in CUDA_GRAPH_MODES
            self._run = self._run_torch
        self._run(list(inputs))  # compile / load now, not on the first real call
        self.build_seconds = time.perf_counter() - started

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        _check_inputs(self.names, self.specs, inputs)
        return self._run(list(inputs))

    def _run_torch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            out = self._compiled(*inputs)
        return out.clone() if self._clone else out

    def _run_onnxruntime(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        feeds = {name: value.detach().cpu().numpy() for name, value in zip(self.names, inputs)}
        (out,) = self._session.run(None, feeds)
        return torch.from_numpy(out).to(self.device)

    def save_onnx(self, path: str | Path) -> Path:
        """Write the ONNX model (``backend="onnxruntime"`` only) with its metadata, atomically."""
        if self.onnx is None:
            raise ConfigError(f"this graph runs with {self.backend}; trace it with backend='onnxruntime' to save it")
        return write_atomic(path, self.onnx)


def _check_inputs(names: list[str], specs: list[dict], inputs: Sequence[Any]) -> None:
    """Raise :class:`bac.ConfigError` unless ``inputs`` have the shapes and dtypes a graph was made for."""
    if len(inputs) != len(specs):
        raise ConfigError(f"the graph takes {len(specs)} inputs, got {len(inputs)}")
    for name, value, spec in zip(names, inputs, specs):
        if not isinstance(value, torch.Tensor) or _spec(value) != spec:
            got = _spec(value) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConfigError(f"the graph was traced for {name} {spec}, got {got}: trace one for these inputs")


def _onnx_modules():
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"ONNX export needs onnx, onnxscript and onnxruntime: "
                                  f"pip install 'bac[export]' ({err})") from err
    return onnxruntime


def to_onnx(exported: torch.export.ExportedProgram, inputs: Sequence[torch.Tensor], metadata: dict) -> bytes:
    """The traced call as a serialised ONNX model (inputs ``input_0``, ...; output ``output``), with
    ``metadata`` as JSON under the model's metadata key :data:`METADATA_KEY`."""
    _onnx_modules()
    names = [f"input_{i}" for i in range(len(inputs))]
    # The exporter prints its progress, logs a warning per torchvision operator it cannot register when
    # torchvision is absent (bac does not use it), and trips a deprecation inside torch's own pytree code.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(None), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            program = torch.onnx.export(exported, tuple(inputs), input_names=names, output_names=["output"],
                                        dynamo=True, verbose=False)
    finally:
        exporter_log.setLevel(level)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, sort_keys=True)
    return proto.SerializeToString()


def _session(model: bytes, device: torch.device, threads: int | None):
    onnxruntime = _onnx_modules()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return onnxruntime.InferenceSession(model, options, providers=providers)


class OnnxCall:
    """An exported call read back from its file: ``OnnxCall(path)``; :attr:`metadata` is what
    :func:`to_onnx` stored, and calling it checks the inputs against the model's own input shapes."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", threads: int | None = None):
        path = Path(path)
        try:
            model = path.read_bytes()
        except OSError as err:
            raise CheckpointError(f"cannot read exported call {path}: {err}") from err
        try:
            self._session = _session(model, torch.device(device), threads)
        except Exception as err:  # onnxruntime raises its own exception types for a malformed model
            raise CheckpointError(f"{path} is not an ONNX model ONNX Runtime can load: {err}") from err
        meta = self._session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if meta is None:
            raise CheckpointError(f"{path} has no bac metadata: export it with bac-export")
        try:
            self.metadata = json.loads(meta)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: its bac metadata is not JSON ({err})") from err
        self.path, self.device = path, torch.device(device)
        self.names = [i.name for i in self._session.get_inputs()]
        self.specs = [{"shape": list(i.shape), "dtype": _ONNX_DTYPES.get(i.type, i.type)}
                      for i in self._session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        _check_inputs(self.names, self.specs, inputs)
        feeds = {name: value.detach().cpu().numpy() for name, value in zip(self.names, inputs)}
        (out,) = self._session.run(None, feeds)
        return torch.from_numpy(out).to(self.device)


_ONNX_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
                "tensor(bool)": "bool", "tensor(int64)": "int64", "tensor(int32)": "int32"}
