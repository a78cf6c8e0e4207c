"""KV-cache surgery for the continuous batcher: merge two batches, drop rows, trim columns.

Tensors are [rows, heads, time, head_dim]; a cache is a transformers DynamicCache (layers of
keys/values) or the legacy tuple ((k, v), ...) per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Zeros prepended along `dim` (zero keys/values under a zero mask are never attended)."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim)


def mergeable(cache: Any) -> bool:
    """Plain full-attention caches only: sliding/static/quantized layers keep extra state."""
    if isinstance(cache, tuple):
        return True
    layers = getattr(cache, "layers", None)
    return layers is not None and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def _tensors(cache: Any) -> list[tuple[Any, str, torch.Tensor]]:
    """(holder, attribute, tensor) for every key/value tensor of a DynamicCache."""
    return [
        (layer, name, getattr(layer, name))
        for layer in cache.layers
        for name in ("keys", "values")
        if getattr(layer, name, None) is not None and getattr(layer, name).dim() == 4
    ]


def map_cache(cache: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(cache, tuple):  # legacy ((k, v), ...) per layer
        return tuple(tuple(fn(t) for t in layer) for layer in cache)
    for holder, name, t in _tensors(cache):
        setattr(holder, name, fn(t))
    return cache


def merge_cache(a: Any, b: Any, pad_a: int, pad_b: int) -> Any:
    """Cache of a's rows then b's rows, the shorter left-padded along time."""

    def join(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([pad_left(x, pad_a, 2), pad_left(y, pad_b, 2)], 0)

    if isinstance(a, tuple):
        return tuple(tuple(join(x, y) for x, y in zip(la, lb, strict=True)) for la, lb in zip(a, b, strict=True))
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb):
        raise RuntimeError("KV caches of different shapes cannot be merged")
    joined = [join(x, y) for (_, _, x), (_, _, y) in zip(ta, tb, strict=True)]  # all built before any is set
    for (holder, name, _), t in zip(ta, joined, strict=True):
        setattr(holder, name, t)
    return a


def select_rows(past: Any, idx: torch.Tensor) -> Any:
    """The cache restricted to the rows `idx` (in that order)."""
    if hasattr(past, "batch_select_indices"):
        past.batch_select_indices(idx)
        return past
    layers = getattr(past, "layers", None)
    if layers is not None:
        for layer in layers:
            layer.batch_select_indices(idx)
        return past
    if isinstance(past, tuple):
        return tuple(tuple(t.index_select(0, idx) for t in layer) for layer in past)
    raise RuntimeError("cannot select rows of the KV cache")


def layer_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a DynamicCache of DynamicLayers (see mergeable)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_of(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A DynamicCache holding these per-layer keys/values (the past of a prefill)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers)
