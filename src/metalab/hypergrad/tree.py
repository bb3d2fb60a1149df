"""Arithmetic on Params (``dict[str, Tensor]``) seen as one vector: the vector space every linear
solver and hypergradient in metalab.hypergrad works in.

Every function is pure, keeps the keys (and their order) of its first argument, and is written
with plain tensor ops so that it runs under ``torch.func.vmap`` / ``grad`` / ``jvp`` and on any
device. A "scalar" here is a Python number or a 0-d tensor; under vmap a 0-d tensor may carry a
hidden batch dimension (one scalar per system), which is why nothing here calls ``.item()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from metalab.types import Params

__all__ = [
    "tree_map",
    "tree_add",
    "tree_sub",
    "tree_scale",
    "tree_dot",
    "tree_norm",
    "tree_zeros_like",
    "tree_ravel",
]

Scalar = float | Tensor


def tree_map(fn: Callable[..., Tensor], tree: Params, *rest: Params) -> Params:
    """``{k: fn(tree[k], *(r[k] for r in rest))}``; every tree must have ``tree``'s keys."""
    return {key: fn(value, *(other[key] for other in rest)) for key, value in tree.items()}


def tree_add(a: Params, b: Params, alpha: Scalar = 1.0) -> Params:
    """``a + alpha * b``, with ``alpha`` a number or a 0-d tensor."""
    return tree_map(lambda x, y: x + alpha * y, a, b)


def tree_sub(a: Params, b: Params) -> Params:
    """``a - b``."""
    return tree_map(torch.sub, a, b)


def tree_scale(a: Params, alpha: Scalar) -> Params:
    """``alpha * a``, with ``alpha`` a number or a 0-d tensor."""
    return tree_map(lambda x: alpha * x, a)


def tree_dot(a: Params, b: Params) -> Tensor:
    """Euclidean inner product ``sum_k <a[k], b[k]>`` of the flattened trees: a 0-d tensor."""
    return torch.stack([(a[key] * b[key]).sum() for key in a]).sum()


def tree_norm(a: Params) -> Tensor:
    """Euclidean norm of the flattened tree: a 0-d tensor."""
    return tree_dot(a, a).sqrt()


def tree_zeros_like(a: Params) -> Params:
    """Zeros with ``a``'s keys, shapes, dtypes and devices."""
    return tree_map(torch.zeros_like, a)


def tree_ravel(tree: Params) -> tuple[Tensor, Callable[[Tensor], Params]]:
    """Flatten ``tree`` into one vector ``[n]`` (n = total number of elements, keys in order) and
    return it with the inverse map ``[n] -> Params`` (as JAX's ``ravel_pytree``).

    The vector has the promoted dtype of the leaves; the inverse casts each leaf back.
    """
    keys = list(tree)
    shapes = [tree[key].shape for key in keys]
    dtypes = [tree[key].dtype for key in keys]
    sizes = [tree[key].numel() for key in keys]
    flat = torch.cat([tree[key].reshape(-1) for key in keys])

    def unravel(vector: Tensor) -> Params:
        chunks = torch.split(vector, sizes)
        return {key: chunk.reshape(shape).to(dtype) for key, chunk, shape, dtype in zip(keys, chunks, shapes, dtypes)}

    return flat, unravel
