"""Activation perturbation points, captured by method interception.

The activations that post-training quantization rounds are the inputs of every
``nn.Conv`` / ``nn.Dense`` call except the first one in execution order (that
one reads the network input, which is not an activation). This module finds
those tensors in *any* Flax linen model, without edits to the model, by
intercepting the layers' ``__call__`` with :func:`flax.linen.intercept_methods`,
and lets a caller replace each of them by ``transform(key, x)``:

* the gradient penalty adds a zero perturbation ``eps[key]`` and differentiates
  with respect to ``eps`` to get ∇_A L (:func:`perturbed`);
* post-training quantization and STE training fake-quantize them
  (:func:`l1grad.quant.quantized_activations`);
* research code records, clips or injects noise into them
  (:func:`transform_layer_inputs`).

Keys are the reading layer's module path joined by ``/`` (``"Block_0/Conv_1"``,
:func:`l1grad.params.layer_name`, the name its kernel goes by too).
One tensor read by several layers (a ResNet block input feeding both the first
conv and the projection shortcut) is one activation: hardware quantizes it once,
so it is one point, keyed by its first reader, transformed once and shared.
A layer module applied several times gets ``"#1"``, ``"#2"``… on later calls.

Every context here serves one forward pass of one model at a time: the
interceptor restarts its bookkeeping whenever a layer of a different
``model.apply`` call (a new root scope) runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from l1grad.params import layer_name

__all__ = [
  "LAYER_TYPES",
  "Transform",
  "activation_shapes",
  "lookup_point",
  "perturbed",
  "transform_layer_inputs",
  "zero_perturbations",
]

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv, nn.Dense)

Transform = Callable[[str, jax.Array], jax.Array]


class _LayerInputInterceptor:
  """Replaces each perturbation point ``x`` by ``transform(key, x)``."""

  def __init__(self, transform: Transform, layer_types: tuple[type, ...]):
    self._transform = transform
    self._layer_types = layer_types
    self._root = None
    self._reset()

  def _reset(self):
    # (input, replacement) pairs: identity of the traced array is what makes
    # a tensor read by two layers one activation.
    self._seen: list[tuple[Any, Any]] = []
    self._calls: dict[str, int] = {}

  def _key(self, module: nn.Module) -> str:
    path = layer_name(module.scope.path)
    count = self._calls.get(path, 0)
    self._calls[path] = count + 1
    return path if count == 0 else f"{path}#{count}"

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(
      module, self._layer_types
    ):
      return next_fun(*args, **kwargs)
    root = module.scope.root
    if root is not self._root:
      self._root = root
      self._reset()
    if args:
      x, rest, kw = args[0], args[1:], kwargs
    else:
      kw = dict(kwargs)
      x, rest = kw.pop("inputs"), ()
    for seen, replacement in self._seen:
      if seen is x:
        key = self._key(module)  # counts the call; the value is shared
        return next_fun(replacement, *rest, **kw)
    key = self._key(module)
    replacement = x if not self._seen else self._transform(key, x)
    self._seen.append((x, replacement))
    return next_fun(replacement, *rest, **kw)


@contextlib.contextmanager
def transform_layer_inputs(
  transform: Transform,
  *,
  layer_types: tuple[type[nn.Module], ...] = LAYER_TYPES,
) -> Iterator[None]:
  """Within the context, every perturbation point ``x`` becomes ``transform(key, x)``.

  Args:
    transform: ``(key, x) -> x'``, called once per activation point per
      forward pass, in execution order.
    layer_types: the layer classes whose inputs are activation points.

  Yields:
    Nothing; wrap ``model.apply`` (or a loss that calls it) in the context.
  """
  with nn.intercept_methods(_LayerInputInterceptor(transform, layer_types)):
    yield


def activation_shapes(
  fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of the perturbation points that ``fn(*args, **kwargs)`` reads.

  Traces ``fn`` with :func:`jax.eval_shape`: no computation runs.

  Args:
    fn: any function that applies a Flax model (a loss, ``model.apply``).
    *args: its arguments (arrays or ``jax.ShapeDtypeStruct``).
    **kwargs: its keyword arguments.

  Returns:
    ``{key: ShapeDtypeStruct}`` in execution order.
  """
  shapes: dict[str, jax.ShapeDtypeStruct] = {}

  def record(key: str, x: jax.Array) -> jax.Array:
    shapes[key] = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x

  def traced(*a, **k):
    with transform_layer_inputs(record):
      return fn(*a, **k)

  jax.eval_shape(traced, *args, **kwargs)
  return shapes


def zero_perturbations(
  shapes: Mapping[str, jax.ShapeDtypeStruct],
) -> dict[str, jax.Array]:
  """Zero perturbations ``eps`` for :func:`perturbed`, one per point."""
  return {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}


def lookup_point(table: Mapping[str, Any], key: str, what: str) -> Any:
  """``table[key]``, or a KeyError that lists the known points.

  Args:
    table: A per-point table (perturbations, activation ranges, ...).
    key: An activation point's key.
    what: What the table holds, for the message (e.g. ``"activation range"``).

  Returns:
    ``table[key]``.

  Raises:
    KeyError: ``key`` is not in ``table``; the message lists the keys that
      are.
  """
  try:
    return table[key]
  except KeyError:
    raise KeyError(
      f"No {what} for activation point {key!r}; known points:"
      f" {sorted(table)}. Build it with l1grad.perturb.activation_shapes on"
      " the same function and input shapes."
    ) from None


@contextlib.contextmanager
def perturbed(eps: Mapping[str, ArrayLike]) -> Iterator[None]:
  """Adds ``eps[key]`` to each perturbation point.

  With ``eps`` all zeros the forward pass is unchanged, and ``jax.grad`` with
  respect to ``eps`` gives ∇_A L at every point.

  Args:
    eps: ``{key: array}`` shaped like :func:`activation_shapes`.

  Yields:
    Nothing.
  """

  def add(key: str, x: jax.Array) -> jax.Array:
    return x + jnp.asarray(lookup_point(eps, key, "perturbation"), x.dtype)

  with transform_layer_inputs(add):
    yield


# Activation quantization lived here before it moved to l1grad.quant (which
# imports this module, so these old names are resolved lazily).
_MOVED_TO_QUANT = (
  "activation_scale",
  "dynamic_range",
  "quantize_activation",
  "quantized_activations",
)


def __getattr__(name: str) -> Any:
  if name in _MOVED_TO_QUANT:
    from l1grad import quant  # pylint: disable=g-import-not-at-top

    return getattr(quant, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
