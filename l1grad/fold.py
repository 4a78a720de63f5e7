"""Batch-norm folding: Conv/Dense → BatchNorm pairs merged into one layer.

Folding works on any Flax linen model without edits: the Conv/Dense →
BatchNorm pairs are discovered by tracing the model with
:func:`flax.linen.intercept_methods` (:func:`find_conv_bn_pairs`), the
variables are rewritten (:func:`fold_batch_norm`), and the folded model is run
through the same mechanism (:func:`folded_apply`), so it composes with other
interceptors (e.g. the one that fake-quantizes layer inputs during
post-training quantization).

A batch norm in evaluation mode is a per-channel affine map of its input,
``BN(y) = y·a + c`` with ``a = γ / sqrt(var + ε)`` and ``c = β - μ·a``.
:func:`fold_factors` gives ``(a, c)`` of every folded layer by layer name
(``"Block_0/Conv_1"``, see :func:`l1grad.params.layer_name`), for research
code that needs them (e.g. to map a folded kernel's scale back to the
unfolded one).

Module paths inside :class:`BatchNormLink` and :class:`FoldedVariables` are
tuples of module names, as Flax's ``module.path`` spells them.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp

from l1grad.params import layer_name

__all__ = [
  "BatchNormLink",
  "FoldFactors",
  "FoldedVariables",
  "ModulePath",
  "find_conv_bn_pairs",
  "fold_batch_norm",
  "fold_factors",
  "folded_apply",
]

ModulePath = tuple[str, ...]


class BatchNormLink(NamedTuple):
  """The batch norm that follows a Conv/Dense layer.

  Attributes:
    path: The BatchNorm module's path, e.g. ``('Block_0', 'BatchNorm_0')``.
    epsilon: Its ``epsilon`` attribute (needed to fold ``1/sqrt(var + eps)``).
  """

  path: ModulePath
  epsilon: float


class FoldFactors(NamedTuple):
  """A batch norm as the per-channel affine map ``BN(y) = y·scale + shift``.

  Attributes:
    scale: ``γ / sqrt(var + ε)``, one value per output channel.
    shift: ``β - μ·scale``: the folded bias of a layer without bias.
  """

  scale: jax.Array
  shift: jax.Array


def _first_input(
  args: tuple[Any, ...], kwargs: Mapping[str, Any], name: str
) -> Any:
  if args:
    return args[0]
  return kwargs.get(name)


def _is_linear(module: nn.Module) -> bool:
  # Exact layer classes whose kernel's last axis is the output feature axis
  # and whose output the interceptor sees; subclasses keep that contract.
  return isinstance(module, (nn.Conv, nn.Dense))


def _normalizes_last_axis(axis: int | tuple[int, ...], ndim: int) -> bool:
  """Whether a BatchNorm ``axis`` is exactly the last axis of an input."""
  if ndim == 0:
    return False
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"axis {a} out of range for an array of rank {ndim}")
  return {a % ndim for a in axes} == {ndim - 1}


def find_conv_bn_pairs(
  model: nn.Module, variables: Any, *args: Any, **kwargs: Any
) -> dict[ModulePath, BatchNormLink]:
  """Finds every BatchNorm applied directly to a Conv/Dense output.

  Traces ``model.apply(variables, *args, **kwargs)`` under
  :func:`jax.eval_shape` (no computation) with a method interceptor that
  records each ``nn.Conv``/``nn.Dense`` output and each ``nn.BatchNorm``
  input. A BN is paired with a layer when its input *is* (the same traced
  object) that layer's output. Pass evaluation-mode arguments (e.g.
  ``train=False``) so that BatchNorm uses its running statistics; those are
  what gets folded.

  A pair is only formed when folding is exact in every case the trace can
  see: the layer and the BN are each called once (no weight sharing), the
  layer's output is read by no other Conv/Dense/BatchNorm, and the BN
  normalizes the last (channel) axis. Reads of the layer output by plain jnp
  code (e.g. a residual sum of the pre-BN value) cannot be seen by an
  interceptor; such a model must not be folded.

  Args:
    model: Any linen model built from ``nn.Conv``/``nn.Dense``/
      ``nn.BatchNorm``.
    variables: Its variables (``{'params': ..., 'batch_stats': ...}``).
    *args: Positional arguments of ``model.apply`` (e.g. a batch; only its
      shape and dtype matter).
    **kwargs: Keyword arguments of ``model.apply`` (e.g. ``train=False``).

  Returns:
    ``{layer_path: BatchNormLink(bn_path, epsilon)}``, paths as tuples of
    module names, e.g. ``{('Conv_0',): BatchNormLink(('BatchNorm_0',),
    1e-5)}``.
  """
  # Recorded in Python while tracing. Tracers are kept alive in these lists,
  # so identity comparisons (`is`) cannot be fooled by id() reuse.
  outputs: list[tuple[Any, ModulePath]] = []
  bn_calls: list[tuple[Any, ModulePath, float, bool]] = []
  reads: list[Any] = []
  calls: collections.Counter[ModulePath] = collections.Counter()

  def recorder(next_fun, call_args, call_kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*call_args, **call_kwargs)
    if isinstance(module, nn.BatchNorm):
      x = _first_input(call_args, call_kwargs, "x")
      path = tuple(module.path)
      calls[path] += 1
      reads.append(x)
      channel_last = _normalizes_last_axis(module.axis, getattr(x, "ndim", 0))
      bn_calls.append((x, path, float(module.epsilon), channel_last))
      return next_fun(*call_args, **call_kwargs)
    if _is_linear(module):
      path = tuple(module.path)
      calls[path] += 1
      reads.append(_first_input(call_args, call_kwargs, "inputs"))
      y = next_fun(*call_args, **call_kwargs)
      outputs.append((y, path))
      return y
    return next_fun(*call_args, **call_kwargs)

  def trace(variables):
    # Only the variables are traced; args/kwargs are closed over so that
    # Python flags passed positionally (e.g. `train`) stay static. Every
    # layer output depends on traced params, so identities still hold.
    with nn.intercept_methods(recorder):
      return model.apply(variables, *args, **kwargs)

  jax.eval_shape(trace, variables)

  pairs: dict[ModulePath, BatchNormLink] = {}
  for x, bn_path, epsilon, channel_last in bn_calls:
    producers = [path for y, path in outputs if y is x]
    if len(producers) != 1 or not channel_last:
      continue
    (layer_path,) = producers
    n_reads = sum(1 for r in reads if r is x)
    if calls[layer_path] == 1 and calls[bn_path] == 1 and n_reads == 1:
      pairs[layer_path] = BatchNormLink(bn_path, epsilon)
  return pairs


@flax.struct.dataclass
class FoldedVariables:
  """Variables of a model whose batch norms are folded into the layers before.

  A pytree (``pairs`` is static), so it can be passed through ``jax.jit``.

  Attributes:
    params: The params tree with each paired kernel scaled per output channel
      by ``γ/sqrt(var + ε)``, each existing bias replaced by
      ``(b - μ)·γ/sqrt(var + ε) + β``, and the paired BatchNorms' params
      removed.
    biases: ``{layer_path: folded bias}`` for paired layers that have no bias
      parameter (``use_bias=False``); added to their output by
      :func:`folded_apply`.
    state: The other collections (e.g. ``batch_stats`` of BatchNorms that
      were not folded), with the folded BatchNorms' entries removed.
    pairs: The pairs that were folded (as from :func:`find_conv_bn_pairs`).
  """

  params: Any
  biases: dict[ModulePath, jax.Array]
  state: dict[str, Any]
  pairs: Mapping[ModulePath, BatchNormLink] = flax.struct.field(
    pytree_node=False
  )


def _flat(tree: Mapping[str, Any]) -> dict[ModulePath, Any]:
  # Empty nodes are kept, so that flattening and unflattening a collection
  # changes nothing but what was removed.
  return traverse_util.flatten_dict(tree, keep_empty_nodes=True)


def _without(flat: Mapping[ModulePath, Any], path: ModulePath) -> dict:
  """``flat`` less every entry under ``path``."""
  return {k: v for k, v in flat.items() if k[: len(path)] != path}


def _affine(
  flat_params: Mapping[ModulePath, Any],
  flat_stats: Mapping[ModulePath, Any],
  link: BatchNormLink,
  dtype: jnp.dtype,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(a, μ, β)`` of a batch norm, ``a = γ / sqrt(var + ε)``, in ``dtype``.

  γ = 1 without a scale param, β = 0 without a bias param.
  """
  mean = jnp.asarray(flat_stats[(*link.path, "mean")], dtype)
  var = jnp.asarray(flat_stats[(*link.path, "var")], dtype)
  gamma = jnp.asarray(flat_params.get((*link.path, "scale"), 1.0), dtype)
  beta = jnp.asarray(flat_params.get((*link.path, "bias"), 0.0), dtype)
  a = gamma * jax.lax.rsqrt(var + jnp.asarray(link.epsilon, dtype))
  return a, mean, beta


def _fold_dtype(kernel: Any) -> jnp.dtype:
  # Arithmetic in float32 at least, whatever the kernel's dtype.
  return jnp.result_type(jnp.asarray(kernel).dtype, jnp.float32)


def fold_factors(
  variables: Mapping[str, Any], pairs: Mapping[ModulePath, BatchNormLink]
) -> dict[str, FoldFactors]:
  """The batch norm of each paired layer as a per-channel scale and shift.

  For a layer with output ``y`` (its bias included, if any) and the batch norm
  that follows it, ``BN(y) = y·scale + shift``; :func:`fold_batch_norm`
  computes the folded kernel as ``kernel·scale`` and the folded bias as
  ``(b - μ)·scale + β`` (= ``b·scale + shift`` up to rounding), or ``shift``
  for a layer without bias.

  Args:
    variables: ``{'params': ..., 'batch_stats': ..., ...}`` of the model,
      unfolded.
    pairs: From :func:`find_conv_bn_pairs`.

  Returns:
    ``{layer name: FoldFactors(scale, shift)}``, names as
    :func:`l1grad.params.layer_name` spells them (``"Block_0/Conv_1"``),
    arrays of shape ``[channels]`` in the kernel's dtype promoted to at least
    float32.
  """
  flat_params = _flat(variables["params"])
  flat_stats = _flat(variables["batch_stats"])
  factors = {}
  for layer_path, link in pairs.items():
    dtype = _fold_dtype(flat_params[(*layer_path, "kernel")])
    a, mean, beta = _affine(flat_params, flat_stats, link, dtype)
    factors[layer_name(layer_path)] = FoldFactors(a, (-mean) * a + beta)
  return factors


def fold_batch_norm(
  variables: Mapping[str, Any], pairs: Mapping[ModulePath, BatchNormLink]
) -> FoldedVariables:
  """Folds each paired BatchNorm into the Conv/Dense layer before it.

  With ``a = γ / sqrt(var + ε)`` per channel (γ = 1 without a scale param,
  β = 0 without a bias param), ``BN(x·W + b) = x·(W·a) + ((b - μ)·a + β)``:
  the kernel is scaled along its last (output-feature) axis, and the bias
  replaced, or, for a layer without a bias param, kept aside in
  ``FoldedVariables.biases``. Arithmetic is done in float32 at least, results
  are cast back to the kernel's dtype. The caller's variables are not
  changed.

  Args:
    variables: ``{'params': ..., 'batch_stats': ..., ...}`` of the model.
    pairs: From :func:`find_conv_bn_pairs`.

  Returns:
    The folded variables; the folded BatchNorms' own variables are dropped
    (they are no longer needed).
  """
  params = _flat(variables["params"])
  state = {name: c for name, c in variables.items() if name != "params"}
  flat_stats = _flat(state["batch_stats"]) if pairs else {}
  biases: dict[ModulePath, jax.Array] = {}
  for layer_path, link in pairs.items():
    kernel = jnp.asarray(params[(*layer_path, "kernel")])
    dtype = _fold_dtype(kernel)
    a, mean, beta = _affine(params, flat_stats, link, dtype)
    params[(*layer_path, "kernel")] = (kernel.astype(dtype) * a).astype(
      kernel.dtype
    )
    bias_path = (*layer_path, "bias")
    if bias_path in params:
      b = jnp.asarray(params[bias_path])
      params[bias_path] = ((b.astype(dtype) - mean) * a + beta).astype(b.dtype)
    else:
      biases[layer_path] = ((-mean) * a + beta).astype(kernel.dtype)
    params = _without(params, link.path)
  folded_state = {}
  for name, collection in state.items():
    if isinstance(collection, Mapping):
      flat = _flat(collection)
      for link in pairs.values():
        flat = _without(flat, link.path)
      collection = traverse_util.unflatten_dict(flat)
    if collection:
      folded_state[name] = collection
  return FoldedVariables(
    params=traverse_util.unflatten_dict(params),
    biases=biases,
    state=folded_state,
    pairs=flax.core.FrozenDict(pairs),
  )


def folded_apply(
  model: nn.Module, folded: FoldedVariables, *args: Any, **kwargs: Any
) -> Any:
  """Runs ``model.apply`` with its batch norms folded.

  Inside the call, each folded BatchNorm returns its input unchanged and each
  folded layer without a bias param gets its folded bias added to its output;
  all other modules run normally. This is done with a method interceptor that
  forwards to ``next_fun`` and acts only on ``__call__``, so it composes with
  other interceptors. An interceptor entered *around* this call runs first
  (outermost): e.g. post-training quantization wraps it as::

    with nn.intercept_methods(quantize_layer_inputs):
      logits = folded_apply(model, folded, images, train=False)

  and sees the folded layers (quantize weights by quantizing
  ``folded.params``; the folded biases stay in float, as an int32 bias would).

  Why a function and not a context manager: the variables passed to
  ``model.apply`` and the interceptor must come from the same
  :class:`FoldedVariables`; one call makes a mismatch impossible.

  Args:
    model: The model the pairs were found on.
    folded: From :func:`fold_batch_norm`.
    *args: Positional arguments of ``model.apply``.
    **kwargs: Keyword arguments of ``model.apply`` (e.g. ``train=False``,
      ``mutable=...``).

  Returns:
    Whatever ``model.apply`` returns.
  """
  bn_paths = {link.path for link in folded.pairs.values()}
  biases = folded.biases

  def interceptor(next_fun, call_args, call_kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*call_args, **call_kwargs)
    module = context.module
    if isinstance(module, nn.BatchNorm) and tuple(module.path) in bn_paths:
      return _first_input(call_args, call_kwargs, "x")
    y = next_fun(*call_args, **call_kwargs)
    if _is_linear(module):
      bias = biases.get(tuple(module.path))
      if bias is not None:
        y = y + bias.astype(y.dtype)
    return y

  with nn.intercept_methods(interceptor):
    return model.apply(
      {"params": folded.params, **folded.state}, *args, **kwargs
    )
