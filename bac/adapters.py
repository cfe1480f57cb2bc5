"""Block adapters: where a model's cacheable sub-blocks are.

A *block* is one residual branch of a transformer layer (``sa``, ``ca`` or ``ffn``): the tensor it adds to
the stream is what the engine caches. The engine never looks inside a model; an adapter, registered per
layer class, gives the layer's branches in execution order and routes each through a *runner* that calls
it or returns the cached value. :class:`BranchAttributes` covers layers that compute each branch with one
callable attribute (``bac.register_adapter(MyLayer, bac.BranchAttributes({"attn": "sa", "mlp": "ffn"}))``),
:class:`ForwardOverride` layers that compute a branch inline. Adapters match layer classes exactly (a
subclass may override ``forward``). docs/guide/caching-methods.md ("Declaring a model's blocks").
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .errors import ConfigError, ConfigTypeError
from .standins import stream_sums
from .state import get_handle

KINDS = ("sa", "ca", "ffn")

Runner = Callable[..., Any]


@dataclass(frozen=True)
class Block:
    """One cacheable residual branch: ``name`` is ``<layer path>.<branch key>``."""

    name: str
    kind: str
    layer: int


def forward_replaced(module: nn.Module) -> bool:
    """Whether ``module`` has an instance ``forward`` other than its own class's (a hook, an accelerator).

    Hook libraries (diffusers' HookRegistry) leave the original bound method on
    the instance after their hooks are removed; that one computes exactly the
    class's forward and is not a replacement.
    """
    forward = module.__dict__.get("forward")
    if forward is None:
        return False
    return getattr(forward, "__func__", None) is not type(module).forward or getattr(forward, "__self__", None) is not module


class LayerAdapter:
    """How to find and route the residual branches of one layer class.

    Subclasses set ``branches`` (``(key, kind)`` pairs in execution order) and
    implement :meth:`install` / :meth:`uninstall`.
    """

    branches: tuple[tuple[str, str], ...] = ()

    def check(self, layer: nn.Module) -> None:
        """Raise :class:`bac.ConfigError` if this adapter cannot reproduce ``layer`` exactly (called for every
        layer)."""

    def install(self, layer: nn.Module, runners: Sequence[Runner]) -> None:
        raise NotImplementedError

    def uninstall(self, layer: nn.Module) -> None:
        raise NotImplementedError

    def batch_dim(self, layer: nn.Module) -> int:
        """Batch dimension of the branch outputs (calibration compares per sample)."""
        return 0

    def width(self, layer: nn.Module) -> int | None:
        """Model width for the plan fingerprint: the first linear layer's input size."""
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                return module.in_features
        return None

    def main_residual(self, outputs: Sequence[Any]) -> list:
        """The layer's residual on its main stream, from its branch outputs in execution order.

        What first-block caches compare (:class:`bac.FirstBlockCache`, :class:`bac.CGTaylor`):
        the change the layer makes to the stream the model denoises (for FLUX's dual-stream
        blocks the image stream, not the text stream), as diffusers' ``FirstBlockCache``
        compares the block's ``hidden_states`` output minus its input. Default: every branch
        output summed per tensor shape, in float32 (one entry per stream for a layer whose
        streams have different shapes).
        """
        return stream_sums(outputs)

    def _check_kinds(self) -> None:
        for key, kind in self.branches:
            if kind not in KINDS:
                raise ConfigError(f"branch {key!r} has kind {kind!r}; expected one of {KINDS}")


class BranchAttributes(LayerAdapter):
    """Branches are callable attributes of the layer (sub-modules or methods).

    ``mapping`` maps attribute name to kind, in execution order. A sub-module's
    ``forward`` (or a method) is replaced on the instance only, so the
    state dict and every other instance stay untouched.
    """

    def __init__(self, mapping: Mapping[str, str], batch_dim: int = 0):
        self.branches = tuple(mapping.items())
        self._batch_dim = batch_dim
        self._check_kinds()

    def batch_dim(self, layer: nn.Module) -> int:
        return self._batch_dim

    def check(self, layer: nn.Module) -> None:
        for attr, _ in self.branches:
            target = getattr(layer, attr, None)
            if target is None or not callable(target):
                raise ConfigError(f"{type(layer).__name__}.{attr} is not a callable branch")
            if (isinstance(target, nn.Module) and forward_replaced(target)) or attr in layer.__dict__:
                raise ConfigError(f"{type(layer).__name__}.{attr} is already replaced on the instance "
                                  "(another accelerator or hook?); remove it first")

    def install(self, layer: nn.Module, runners: Sequence[Runner]) -> None:
        for (attr, _), runner in zip(self.branches, runners):
            target = getattr(layer, attr)
            if isinstance(target, nn.Module):
                target.forward = partial(runner, target.forward)
            elif callable(target):
                setattr(layer, attr, partial(runner, target))
            else:
                raise ConfigTypeError(f"{type(layer).__name__}.{attr} is not callable")

    def uninstall(self, layer: nn.Module) -> None:
        for attr, _ in self.branches:
            target = getattr(layer, attr)
            if isinstance(target, nn.Module):
                target.__dict__.pop("forward", None)
            else:
                layer.__dict__.pop(attr, None)


class ForwardOverride(LayerAdapter):
    """Replace the layer's forward by ``forward(layer, runners, *args, **kwargs)``.

    ``forward`` must compute exactly what the original does, with each whole
    residual branch (norm, gate and all) passed through its runner, so that
    skipping a block skips all of its work.
    """

    def __init__(
        self,
        branches: Sequence[tuple[str, str]],
        forward: Callable[..., Any],
        batch_dim: Callable[[nn.Module], int] | int = 0,
        width: Callable[[nn.Module], int | None] | None = None,
        main_residual: Callable[[Sequence[Any]], list] | None = None,
    ):
        self.branches = tuple(branches)
        self._forward = forward
        self._batch_dim = batch_dim
        self._width = width
        self._main_residual = main_residual
        self._check_kinds()

    def main_residual(self, outputs: Sequence[Any]) -> list:
        return self._main_residual(outputs) if self._main_residual is not None else super().main_residual(outputs)

    def batch_dim(self, layer: nn.Module) -> int:
        return self._batch_dim(layer) if callable(self._batch_dim) else self._batch_dim

    def width(self, layer: nn.Module) -> int | None:
        return self._width(layer) if self._width is not None else super().width(layer)

    def check(self, layer: nn.Module) -> None:
        if forward_replaced(layer):
            raise ConfigError(f"{type(layer).__name__} already has a replaced forward "
                              "(another accelerator or hook?); remove it first")

    def install(self, layer: nn.Module, runners: Sequence[Runner]) -> None:
        layer.forward = partial(self._forward, layer, tuple(runners))

    def uninstall(self, layer: nn.Module) -> None:
        layer.__dict__.pop("forward", None)


_REGISTRY: dict[type, LayerAdapter] = {}


def register_adapter(layer_cls: type, adapter: LayerAdapter) -> LayerAdapter:
    """Register ``adapter`` for layers of exactly ``layer_cls``; returns it."""
    if not isinstance(adapter, LayerAdapter):
        raise ConfigTypeError(f"adapter for {layer_cls.__name__} must be a LayerAdapter, got {type(adapter).__name__}")
    _REGISTRY[layer_cls] = adapter
    return adapter


@dataclass(frozen=True)
class ModelSpec:
    """The blocks of one model, found through adapters, and its fingerprint.

    ``fingerprint`` describes the architecture only (class, layer count, width,
    a digest of the parameter names and shapes); the digest of the weights'
    values is :meth:`weights_digest`, computed on demand because it reads
    every parameter.
    """

    blocks: tuple[Block, ...]
    layers: tuple[tuple[str, nn.Module, LayerAdapter], ...]
    fingerprint: dict
    model: nn.Module | None = field(default=None, compare=False, repr=False)

    def batch_dims(self) -> list[int]:
        return [adapter.batch_dim(layer) for _, layer, adapter in self.layers for _ in adapter.branches]

    def weights_digest(self) -> str:
        """:func:`weights_digest` of the described model, now (not cached: the weights may have changed)."""
        if self.model is None:
            raise ConfigError("this ModelSpec was built without its model; describe the model with bac.describe")
        return weights_digest(self.model)


def _parameter_digest(model: nn.Module) -> str:
    shapes = [(name, list(p.shape)) for name, p in model.named_parameters()]
    return hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]


def weights_digest(model: nn.Module) -> str:
    """SHA-256 (first 32 hex digits) of every parameter's name, dtype, shape and bytes, in registration order.

    What a calibration was made on: another checkpoint, a fine-tuned or
    re-cast (``.half()``) copy of the same architecture gives another digest.
    Deterministic across runs and devices (a CUDA parameter is hashed from
    its bytes copied to the host). Reads every byte once (what that costs:
    docs/guide/core.md, "Inside the engine").
    """
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        digest.update(f"{name}:{str(t.dtype).removeprefix('torch.')}:{list(t.shape)};".encode())
        if t.numel():
            # bytes viewed without a copy (any dtype, also bfloat16, which NumPy lacks)
            digest.update(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()[:32]


def describe(model: nn.Module, adapters: Mapping[type, LayerAdapter] | None = None) -> ModelSpec:
    """Find every adapted layer of ``model`` (in registration order) and its blocks.

    ``adapters`` adds or overrides adapters for this call only. Layers are
    numbered in module registration order, which must be execution order
    (calibration checks it). Every layer is checked by its adapter
    (:meth:`LayerAdapter.check`), so an unsupported layer fails here, before
    anything is changed.
    """
    lookup = {**_REGISTRY, **(adapters or {})}
    accelerated = get_handle(model) is not None  # its replaced forwards are bac's own
    layers: list[tuple[str, nn.Module, LayerAdapter]] = []
    for path, module in model.named_modules():
        adapter = lookup.get(type(module))
        if adapter is None or any(path.startswith(outer + ".") for outer, _, _ in layers):
            continue
        if not accelerated:
            adapter.check(module)
        layers.append((path, module, adapter))
    if not layers:
        raise ConfigError(
            f"{type(model).__name__} has no layer with a registered block adapter; "
            "declare its layers with bac.register_adapter(LayerClass, bac.BranchAttributes({...}))"
        )
    blocks = tuple(
        Block(f"{path}.{key}" if path else key, kind, index)
        for index, (path, _, adapter) in enumerate(layers)
        for key, kind in adapter.branches
    )
    cls = type(model)
    fingerprint = {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "num_layers": len(layers),
        "width": layers[0][2].width(layers[0][1]),
        "parameters": _parameter_digest(model),
    }
    return ModelSpec(blocks, tuple(layers), fingerprint, model)


# --- PyTorch's own transformer layers -------------------------------------------------
# Pre-norm branches include their norm so a skipped block costs nothing;
# post-norm layers normalise the stream after the add, outside the branch.


def _sa(layer, x, mask, key_padding_mask, is_causal):
    return layer._sa_block(x, mask, key_padding_mask, is_causal)


def _pre_sa(layer, x, mask, key_padding_mask, is_causal):
    return layer._sa_block(layer.norm1(x), mask, key_padding_mask, is_causal)


def _ca(layer, x, memory, mask, key_padding_mask, is_causal):
    return layer._mha_block(x, memory, mask, key_padding_mask, is_causal)


def _pre_ca(layer, x, memory, mask, key_padding_mask, is_causal):
    return layer._mha_block(layer.norm2(x), memory, mask, key_padding_mask, is_causal)


def _ffn(layer, x):
    return layer._ff_block(x)


def _pre_ffn_decoder(layer, x):
    return layer._ff_block(layer.norm3(x))


def _pre_ffn_encoder(layer, x):
    return layer._ff_block(layer.norm2(x))


def _decoder_layer_forward(
    layer: nn.TransformerDecoderLayer,
    runners: tuple[Runner, Runner, Runner],
    tgt: torch.Tensor,
    memory: torch.Tensor,
    tgt_mask: torch.Tensor | None = None,
    memory_mask: torch.Tensor | None = None,
    tgt_key_padding_mask: torch.Tensor | None = None,
    memory_key_padding_mask: torch.Tensor | None = None,
    tgt_is_causal: bool = False,
    memory_is_causal: bool = False,
) -> torch.Tensor:
    sa, ca, ffn = runners
    x = tgt
    if layer.norm_first:
        x = x + sa(_pre_sa, layer, x, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x = x + ca(_pre_ca, layer, x, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        x = x + ffn(_pre_ffn_decoder, layer, x)
    else:
        x = layer.norm1(x + sa(_sa, layer, x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
        x = layer.norm2(x + ca(_ca, layer, x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
        x = layer.norm3(x + ffn(_ffn, layer, x))
    return x


def _encoder_layer_forward(
    layer: nn.TransformerEncoderLayer,
    runners: tuple[Runner, Runner],
    src: torch.Tensor,
    src_mask: torch.Tensor | None = None,
    src_key_padding_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    # PyTorch's standard (non-fused) path: the fused inference kernel cannot
    # return per-branch outputs. Same ops as the original's non-fused path.
    src_key_padding_mask = nn.functional._canonical_mask(
        mask=src_key_padding_mask,
        mask_name="src_key_padding_mask",
        other_type=nn.functional._none_or_dtype(src_mask),
        other_name="src_mask",
        target_type=src.dtype,
    )
    src_mask = nn.functional._canonical_mask(
        mask=src_mask, mask_name="src_mask", other_type=None, other_name="", target_type=src.dtype, check_other=False
    )
    sa, ffn = runners
    x = src
    if layer.norm_first:
        x = x + sa(_pre_sa, layer, x, src_mask, src_key_padding_mask, is_causal)
        x = x + ffn(_pre_ffn_encoder, layer, x)
    else:
        x = layer.norm1(x + sa(_sa, layer, x, src_mask, src_key_padding_mask, is_causal))
        x = layer.norm2(x + ffn(_ffn, layer, x))
    return x


def _attention_batch_dim(layer: nn.Module) -> int:
    return 0 if layer.self_attn.batch_first else 1


def _attention_width(layer: nn.Module) -> int:
    return layer.self_attn.embed_dim


register_adapter(
    nn.TransformerDecoderLayer,
    ForwardOverride(
        [("sa", "sa"), ("ca", "ca"), ("ffn", "ffn")], _decoder_layer_forward, _attention_batch_dim, _attention_width
    ),
)
register_adapter(
    nn.TransformerEncoderLayer,
    ForwardOverride([("sa", "sa"), ("ffn", "ffn")], _encoder_layer_forward, _attention_batch_dim, _attention_width),
)
