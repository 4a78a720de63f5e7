"""Which parameters are the weights, and the one name every layer goes by.

The weights that the penalty regularizes, the quantizer rounds, batch-norm
folding scales and the analysis perturbs are the same tensors: every leaf named
``kernel`` (Flax's name for the weight of ``nn.Conv``, ``nn.Dense`` and their
relatives). :func:`is_kernel_path` is the one test for that, used by all of
them.

A layer is named by its module path joined with ``/``: ``"Block_0/Conv_1"``
for the kernel at ``params["Block_0"]["Conv_1"]["kernel"]``.
:func:`layer_name` spells it (with :func:`jax.tree_util.keystr`); the same
spelling keys kernels (:func:`split_kernels`), activation perturbation points
(:mod:`l1grad.perturb`, the reading layer's path), batch-norm fold factors
(:func:`l1grad.fold.fold_factors`) and every per-layer result built on them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

__all__ = [
  "PyTree",
  "is_kernel_path",
  "layer_name",
  "split_kernels",
]

PyTree = Any

_KEY_TYPES = (
  jax.tree_util.DictKey,
  jax.tree_util.GetAttrKey,
  jax.tree_util.SequenceKey,
  jax.tree_util.FlattenedIndexKey,
)


def layer_name(path: Sequence[Any]) -> str:
  """The ``/``-joined name of a module path: ``"Block_0/Conv_1"``.

  Args:
    path: A key path from :func:`jax.tree_util.tree_flatten_with_path`
      (``DictKey`` and other key entries), or module names such as a linen
      module's ``module.path`` (``('Block_0', 'Conv_1')``).

  Returns:
    The entries' plain names joined with ``/`` (``""`` for an empty path).
  """
  keys = tuple(
    k if isinstance(k, _KEY_TYPES) else jax.tree_util.DictKey(k) for k in path
  )
  return jax.tree_util.keystr(keys, simple=True, separator="/")


def is_kernel_path(path: Sequence[Any]) -> bool:
  """Whether a ``tree_flatten_with_path`` key path ends at a ``kernel`` leaf."""
  return bool(path) and layer_name(path[-1:]) == "kernel"


def split_kernels(
  params: PyTree,
) -> tuple[dict[str, jax.Array], Callable[[Mapping[str, jax.Array]], PyTree]]:
  """The kernels of ``params`` by layer name, and a function that merges back.

  Args:
    params: A params tree (e.g. ``variables["params"]``, or the ``params`` of
      :class:`l1grad.fold.FoldedVariables`).

  Returns:
    ``(kernels, merge)``. ``kernels`` maps each layer's :func:`layer_name`
    (``"Conv_0"``, ``"Block_0/Conv_1"``) to its kernel, in the tree's leaf
    order (the order in which sums over kernels are taken, so that they
    round the same way everywhere). ``merge(new_kernels)`` rebuilds the
    params tree with the given kernels (all of them or some) and every other
    leaf of ``params`` unchanged.

  Raises:
    ValueError: Two kernels whose layers have the same name.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  index: dict[str, int] = {}
  for i, (path, _) in enumerate(flat):
    if is_kernel_path(path):
      name = layer_name(path[:-1])
      if name in index:
        raise ValueError(f"Two kernels are named {name!r}.")
      index[name] = i
  leaves = [leaf for _, leaf in flat]
  kernels = {name: leaves[i] for name, i in index.items()}

  def merge(new_kernels: Mapping[str, jax.Array]) -> PyTree:
    merged = list(leaves)
    for name, kernel in new_kernels.items():
      if name not in index:
        raise KeyError(
          f"No kernel named {name!r}; the kernels are {list(index)}."
        )
      merged[index[name]] = kernel
    return jax.tree_util.tree_unflatten(treedef, merged)

  return kernels, merge
