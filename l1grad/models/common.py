"""Layer conventions shared by every model in ``l1grad.models``.

The rest of the library relies on these conventions, so they are defined once
here rather than in each model:

* every weight lives in a plain ``nn.Conv`` / ``nn.Dense`` leaf named
  ``kernel``, because the penalty and post-training quantization find weights
  by that name and intercept those two classes with
  ``flax.linen.intercept_methods``;
* a batch norm is applied directly to the output of the Conv/Dense before it,
  which then has no bias, so that post-training quantization can fold the
  batch norm into that kernel and take activation ranges from its β and γ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# A partially applied Module constructor, as in flax examples/imagenet.
ModuleDef = Callable[..., nn.Module]
Dtype = Any

# PyTorch's BatchNorm2d defaults (momentum 0.1 on the new value, eps 1e-5):
# the paper trained in PyTorch, and matching it keeps torchvision checkpoints
# (running statistics included) portable to these models.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def batch_norm(train: bool, dtype: Dtype = jnp.float32) -> ModuleDef:
  """Returns the ``nn.BatchNorm`` constructor every model uses.

  Args:
    train: whether the model is training. Training normalises with the batch
      statistics and updates the running averages in ``batch_stats``;
      evaluation uses the running averages and is deterministic.
    dtype: compute dtype, or None for that of the inputs and parameters.
      Statistics are still reduced in at least
      float32 (``force_float32_reductions``), and parameters stay float32.

  Returns:
    A ``functools.partial`` of ``nn.BatchNorm``; call it like the class.
  """
  return functools.partial(
    nn.BatchNorm,
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    dtype=dtype,
  )


def conv_no_bias(dtype: Dtype = jnp.float32) -> ModuleDef:
  """Returns the ``nn.Conv`` constructor for a conv followed by batch norm.

  The bias is dropped because the batch norm's β replaces it; a bias there
  would be a redundant parameter that BN folding would have to carry.

  Args:
    dtype: compute dtype, or None for that of the inputs and parameters;
      parameters stay float32 (``param_dtype`` default).

  Returns:
    A ``functools.partial`` of ``nn.Conv``.
  """
  return functools.partial(nn.Conv, use_bias=False, dtype=dtype)


def logits_float32(x: jax.Array) -> jax.Array:
  """Casts logits to at least float32 so losses are computed in full precision.

  bfloat16/float16 logits become float32; float32 ones are returned as they
  are and float64 ones (``jax_enable_x64``, a model run in float64 to check
  higher-order derivatives) stay float64.

  Args:
    x: logits in the compute dtype.

  Returns:
    The logits in ``promote_types(x.dtype, float32)``.
  """
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def conv_bn_relu_stack(
  x: jax.Array,
  layers: Sequence[int | str],
  *,
  conv: ModuleDef,
  norm: ModuleDef,
) -> jax.Array:
  """Applies a plain (VGG-style) stack of 3×3 conv → BN → ReLU and max-pools.

  Called from inside a ``@nn.compact`` method: the layers it creates become
  submodules of the caller, so the parameter tree stays flat
  (``Conv_0``, ``BatchNorm_0``, …) whichever model uses it.

  Args:
    x: NHWC input.
    layers: torchvision-VGG-style configuration: an int is a 3×3 stride-1
      conv with that many output channels (followed by BN and ReLU), ``"M"`` is
      a 2×2 stride-2 max-pool.
    conv: conv constructor, normally ``conv_no_bias(dtype)``.
    norm: batch norm constructor, normally ``batch_norm(train, dtype)``.

  Returns:
    The NHWC feature map.
  """
  for layer in layers:
    if layer == "M":
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    else:
      # Padding 1 (PyTorch's) equals "SAME" at stride 1; written out so that
      # ported PyTorch weights see the same borders.
      x = conv(int(layer), (3, 3), padding=1)(x)
      x = norm()(x)
      x = nn.relu(x)
  return x


def mlp_classifier(
  x: jax.Array,
  hidden: Sequence[int],
  num_classes: int,
  *,
  norm: ModuleDef | None,
  dropout_rate: float,
  train: bool,
  dtype: Dtype,
) -> jax.Array:
  """Flattens, applies hidden Dense → BN → ReLU layers, then the logits layer.

  Called from inside a ``@nn.compact`` method (see ``conv_bn_relu_stack``).

  Args:
    x: NHWC feature map, or an already flat ``[B, D]`` array.
    hidden: widths of the hidden Dense layers.
    num_classes: number of logits.
    norm: batch norm constructor applied after each hidden Dense (which then
      has no bias), or None for Dense (with bias) → ReLU.
    dropout_rate: dropout before every Dense; 0 adds no Dropout module, so
      training needs no ``dropout`` rng.
    train: whether dropout is active.
    dtype: compute dtype of the Dense layers (None: the inputs').

  Returns:
    Logits ``[B, num_classes]`` in at least float32 (:func:`logits_float32`).
  """
  x = x.reshape((x.shape[0], -1))

  def dropout(y: jax.Array) -> jax.Array:
    if dropout_rate > 0.0:
      y = nn.Dropout(rate=dropout_rate, deterministic=not train)(y)
    return y

  for features in hidden:
    x = dropout(x)
    x = nn.Dense(features, use_bias=norm is None, dtype=dtype)(x)
    if norm is not None:
      x = norm()(x)
    x = nn.relu(x)
  x = dropout(x)
  x = nn.Dense(num_classes, dtype=dtype)(x)
  return logits_float32(x)
