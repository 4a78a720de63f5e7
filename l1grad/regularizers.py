"""Defensive Quantization, the weight-regularization baseline.

Defensive Quantization (Lin et al., ICLR 2019) keeps every layer's Lipschitz
constant (its operator norm) near 1 with an orthogonality penalty, so that
quantization noise is not amplified from layer to layer. It regularizes the
same tensors as the gradient penalty: the Conv/Dense kernels, as
:func:`l1grad.params.is_kernel_path` finds them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# is_kernel_path lived here; importing it keeps regularizers.is_kernel_path.
from l1grad.params import is_kernel_path
from l1grad.params import layer_name

__all__ = ["kernel_leaves", "orthogonality_penalty"]


def kernel_leaves(params: Any) -> list[tuple[str, jax.Array]]:
  """Every Conv/Dense kernel of a params tree, with its path.

  A kernel is a leaf named ``kernel`` (Flax's name for the weight of
  ``nn.Conv``, ``nn.Dense`` and their relatives) with at least two
  dimensions. Biases, batch-norm scales and the like are not kernels.

  Args:
    params: A params tree (e.g. ``variables['params']``).

  Returns:
    ``[(path, kernel), ...]`` in tree-flattening order, paths joined with
    ``/``, e.g. ``[('Conv_0/kernel', ...), ('Dense_0/kernel', ...)]``.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  return [
    (layer_name(path), leaf)
    for path, leaf in leaves
    if is_kernel_path(path) and jnp.ndim(leaf) >= 2
  ]


def _gram_distance_to_identity(w: jax.Array) -> jax.Array:
  """``‖G − I‖²_F`` for the smaller Gram matrix ``G`` of a 2-D ``w``."""
  fan_in, fan_out = w.shape
  # HIGHEST: near convergence G − I is small, and a TF32/bf16 Gram (GPU/TPU
  # default precision) would put its rounding error into the penalty.
  hp = jax.lax.Precision.HIGHEST
  if fan_out <= fan_in:
    gram = jnp.matmul(w.T, w, precision=hp)
  else:
    gram = jnp.matmul(w, w.T, precision=hp)
  eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
  return jnp.sum(jnp.square(gram - eye))


def orthogonality_penalty(params: Any, *, beta: float) -> jax.Array:
  """Defensive Quantization's orthogonality penalty.

  ``β/2 · Σ_l ‖G_l − I‖²_F`` over every Conv/Dense kernel (see
  :func:`kernel_leaves`), each reshaped to ``W_l`` of shape
  ``[fan_in, fan_out] = kernel.reshape(-1, kernel.shape[-1])`` (a layer is
  ``y = x·W``), with ``G_l`` the *smaller* Gram matrix: ``WᵀW``
  (``fan_out × fan_out``) when ``fan_out ≤ fan_in``, else ``WWᵀ``.

  Why the smaller Gram. DQ's argument bounds the layer's Lipschitz constant,
  its operator norm ``σ_max(W)``; ``WᵀW`` and ``WWᵀ`` have the same non-zero
  eigenvalues ``σ_i²``, so either orientation pushes every ``σ_i`` to 1.
  Their gradients are in fact identical (``4·W(WᵀW − I) = 4·(WWᵀ − I)W``) and
  the two values differ by the constant ``|fan_in − fan_out|``: the larger
  Gram has rank at most ``min(fan_in, fan_out)``, so it can never equal the
  identity and its penalty has a floor of ``|fan_in − fan_out|``. The smaller
  Gram is zero exactly for semi-orthogonal ``W`` (orthonormal columns or
  rows), which makes the logged value meaningful, and it is cheaper: a
  3×3×512→512 conv has ``fan_in = 4608``; its ``fan_out²`` Gram has 0.26 M
  entries, the ``fan_in²`` one 21 M. Training is unaffected by the choice.

  Args:
    params: A params tree.
    beta: The DQ coefficient β.

  Returns:
    A float32 scalar (0 for a tree without kernels).
  """
  total = jnp.zeros((), jnp.float32)
  for _, kernel in kernel_leaves(params):
    w = jnp.asarray(kernel)
    w = w.reshape(-1, w.shape[-1])
    w = w.astype(jnp.result_type(w.dtype, jnp.float32))
    total = total + _gram_distance_to_identity(w).astype(jnp.float32)
  return 0.5 * beta * total
