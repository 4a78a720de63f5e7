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

Two conventions for *where* a point is transformed (``POINTS``,
docs/method.md §3):

* ``"layer_inputs"`` (the default): where the Conv/Dense layers read it.
  Another reader of the same tensor that is no Conv/Dense, such as the
  identity shortcut's residual add in a ResNet block, reads the original.
* ``"tensors"``: once for every reader, as an integer deployment that stores
  the tensor once computes. :func:`tensor_sites` traces the model once and
  finds, for each point, the outermost module call (never the model itself)
  whose first positional argument is that very tensor (a ResNet block whose
  input is the point); :func:`transform_layer_inputs` with ``sites``
  transforms that call's argument instead, so every reader inside the call
  (the conv, the projection, the residual add) sees the transformed tensor.
  Keys, shapes and the number of points are those of ``"layer_inputs"``; on
  a model without such a call (no shortcut) the two conventions coincide.
  A reader outside that call (in the body of a module that contains it)
  still reads the original: no module boundary encloses it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import contextlib
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from l1grad.params import layer_name

__all__ = [
  "LAYER_TYPES",
  "POINTS",
  "LayerInput",
  "Transform",
  "activation_shapes",
  "layer_inputs",
  "lookup_point",
  "perturbed",
  "point_sites",
  "tensor_sites",
  "transform_layer_inputs",
  "zero_perturbations",
]

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv, nn.Dense)

Transform = Callable[[str, jax.Array], jax.Array]

# Where a point is transformed (module docstring): at its Conv/Dense readers
# (the default), or once for every reader of the tensor.
POINTS = ("layer_inputs", "tensors")


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


class _TensorInterceptor:
  """The ``"tensors"`` convention: each point transformed for every reader.

  With ``sites=None`` (discovery) it transforms at the layers, like
  :class:`_LayerInputInterceptor`, and records in :attr:`found`, for each
  point, the outermost enclosing module call (not the model's own call)
  whose first positional argument is the point's tensor. With ``sites``
  (``{call: point key}``, what discovery found) it transforms the first
  argument of those calls instead; a layer that reads the result passes it
  through, and a point without a call is transformed at its layer.

  Calls are named like layers, ``layer_name(path)``, plus ``":method"`` for
  a method other than ``__call__`` and ``"#k"`` for the k-th repeat.
  """

  def __init__(
    self,
    transform: Transform,
    layer_types: tuple[type, ...],
    sites: Mapping[str, str] | None = None,
  ):
    self._transform = transform
    self._layer_types = layer_types
    self._sites = sites
    self.found: dict[str, str] = {}
    self._root = None
    self._reset()

  def _reset(self):
    # (input, replacement, point key or None for the network input).
    self._seen: list[tuple[Any, Any, str | None]] = []
    self._calls: dict[str, int] = {}
    self._site_calls: dict[str, int] = {}
    self._stack: list[tuple[str, Any]] = []  # enclosing calls, outermost first
    self._first = True

  def _key(self, module: nn.Module) -> str:
    path = layer_name(module.scope.path)
    count = self._calls.get(path, 0)
    self._calls[path] = count + 1
    return path if count == 0 else f"{path}#{count}"

  def _site(self, module: nn.Module, method: str) -> str:
    name = layer_name(module.scope.path)
    if method != "__call__":
      name = f"{name}:{method}"
    count = self._site_calls.get(name, 0)
    self._site_calls[name] = count + 1
    return name if count == 0 else f"{name}#{count}"

  def _lookup(self, x: Any) -> tuple[Any, str | None] | None:
    for seen, replacement, key in self._seen:
      if seen is x or replacement is x:
        return replacement, key
    return None

  def _record_site(self, x: Any, key: str) -> None:
    for site, arg in self._stack:
      if arg is x:
        self.found.setdefault(site, key)
        return

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    method = context.method_name
    root = module.scope.root
    if root is not self._root:
      self._root = root
      self._reset()
    if method == "__call__" and isinstance(module, self._layer_types):
      return self._layer(next_fun, module, args, kwargs)
    if not args or method == "setup" or not module.scope.path:
      # The model's own call reads the network input: never a site.
      return next_fun(*args, **kwargs)
    site = self._site(module, method)
    x = args[0]
    if self._sites is None:
      entry = (site, x)
      self._stack.append(entry)
      try:
        return next_fun(*args, **kwargs)
      finally:
        if self._stack and self._stack[-1] is entry:
          self._stack.pop()
    key = self._sites.get(site)
    if key is None:
      return next_fun(*args, **kwargs)
    found = self._lookup(x)
    if found is None:
      replacement = self._transform(key, x)
      self._seen.append((x, replacement, key))
    else:
      replacement = found[0]
    return next_fun(replacement, *args[1:], **kwargs)

  def _layer(self, next_fun, module, args, kwargs):
    if args:
      x, rest, kw = args[0], args[1:], kwargs
    else:
      kw = dict(kwargs)
      x, rest = kw.pop("inputs"), ()
    key = self._key(module)
    first, self._first = self._first, False
    found = self._lookup(x)
    if found is not None:  # transformed at a site, or read before
      replacement, point = found
      if self._sites is None and point is not None:
        self._record_site(x, point)
      return next_fun(replacement, *rest, **kw)
    if first:
      self._seen.append((x, x, None))
      return next_fun(x, *rest, **kw)
    replacement = self._transform(key, x)
    self._seen.append((x, replacement, key))
    if self._sites is None:
      self._record_site(x, key)
    return next_fun(replacement, *rest, **kw)


@contextlib.contextmanager
def transform_layer_inputs(
  transform: Transform,
  *,
  layer_types: tuple[type[nn.Module], ...] = LAYER_TYPES,
  sites: Mapping[str, str] | None = None,
) -> Iterator[None]:
  """Within the context, every perturbation point ``x`` becomes ``transform(key, x)``.

  Args:
    transform: ``(key, x) -> x'``, called once per activation point per
      forward pass, in execution order.
    layer_types: the layer classes whose inputs are activation points.
    sites: None (the ``"layer_inputs"`` convention: ``x`` is replaced where
      the layers read it), or :func:`tensor_sites` of the same function
      (the ``"tensors"`` convention: replaced once for every reader).

  Yields:
    Nothing; wrap ``model.apply`` (or a loss that calls it) in the context.
  """
  if sites is None:
    interceptor = _LayerInputInterceptor(transform, layer_types)
  else:
    interceptor = _TensorInterceptor(transform, layer_types, dict(sites))
  with nn.intercept_methods(interceptor):
    yield


def tensor_sites(
  fn: Callable[..., Any],
  *args: Any,
  layer_types: tuple[type[nn.Module], ...] = LAYER_TYPES,
  **kwargs: Any,
) -> dict[str, str]:
  """Where the ``"tensors"`` convention transforms each point.

  Traces ``fn`` with :func:`jax.eval_shape` (no computation runs) and finds,
  for each point, the outermost module call other than the model's own whose
  first positional argument is the point's tensor: in a ResNet the block
  whose input it is, so the residual add inside reads it too.

  Args:
    fn: any function that applies a Flax model (a loss, ``model.apply``).
    *args: its arguments (arrays or ``jax.ShapeDtypeStruct``).
    layer_types: the layer classes whose inputs are activation points.
    **kwargs: its keyword arguments.

  Returns:
    ``{call: point key}`` for :func:`transform_layer_inputs` (``sites``),
    e.g. ``{"ResNetBlock_0": "ResNetBlock_0/Conv_0"}``; points missing from
    it are transformed where their layer reads them.
  """
  interceptor = _TensorInterceptor(lambda key, x: x, layer_types)

  def traced(*a, **k):
    with nn.intercept_methods(interceptor):
      return fn(*a, **k)

  jax.eval_shape(traced, *args, **kwargs)
  return dict(interceptor.found)


def point_sites(
  points: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> dict[str, str] | None:
  """The ``sites`` of convention ``points`` for ``fn(*args, **kwargs)``.

  Args:
    points: ``"layer_inputs"`` or ``"tensors"`` (:data:`POINTS`).
    fn: any function that applies a Flax model.
    *args: its arguments.
    **kwargs: its keyword arguments.

  Returns:
    None for ``"layer_inputs"`` (nothing is traced), else
    :func:`tensor_sites`.

  Raises:
    ValueError: an unknown convention.
  """
  if points not in POINTS:
    raise ValueError(f"points must be one of {POINTS}, got {points!r}.")
  if points == "layer_inputs":
    return None
  return tensor_sites(fn, *args, **kwargs)


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


class LayerInput(NamedTuple):
  """One Conv/Dense call and the activation point it reads.

  Attributes:
    layer: The layer's name (:func:`l1grad.params.layer_name`, the name its
      kernel goes by; no ``#k`` suffix for a module called again).
    point: The key of the perturbation point the call reads, or None where
      it reads a tensor that is no point (the network's input).
  """

  layer: str
  point: str | None


def layer_inputs(
  fn: Callable[..., Any],
  *args: Any,
  layer_types: tuple[type[nn.Module], ...] = LAYER_TYPES,
  **kwargs: Any,
) -> list[LayerInput]:
  """Every Conv/Dense call of ``fn(*args, **kwargs)`` in execution order.

  Which point each call reads is found through :func:`transform_layer_inputs`
  itself (a call reading a tensor that another layer read first gets that
  layer's point), so it follows whatever that function treats as a point.
  Traced with :func:`jax.eval_shape`: no computation runs.

  Args:
    fn: any function that applies a Flax model (a loss, ``model.apply``).
    *args: its arguments (arrays or ``jax.ShapeDtypeStruct``).
    layer_types: the layer classes to list.
    **kwargs: its keyword arguments.

  Returns:
    One :class:`LayerInput` per call, in execution order: the first and the
    last entries are the network's first and last layers.
  """
  calls: list[LayerInput] = []
  # The replacements the transform hands out, and their points: a layer reads
  # the very object returned for its point (or the untouched input).
  marked: list[tuple[Any, str]] = []

  def mark(key: str, x: jax.Array) -> jax.Array:
    y = x + jnp.zeros((), x.dtype)  # a new tracer, told apart by identity
    marked.append((y, key))
    return y

  def record(next_fun, a, kw, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, layer_types):
      x = a[0] if a else kw.get("inputs")
      point = next((k for y, k in marked if y is x), None)
      calls.append(LayerInput(layer_name(module.scope.path), point))
    return next_fun(*a, **kw)

  def traced(*a, **k):
    with transform_layer_inputs(mark, layer_types=layer_types):
      # Entered second, so it runs inside: it sees the replaced inputs.
      with nn.intercept_methods(record):
        return fn(*a, **k)

  jax.eval_shape(traced, *args, **kwargs)
  return calls


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
def perturbed(
  eps: Mapping[str, ArrayLike], *, sites: Mapping[str, str] | None = None
) -> Iterator[None]:
  """Adds ``eps[key]`` to each perturbation point.

  With ``eps`` all zeros the forward pass is unchanged, and ``jax.grad`` with
  respect to ``eps`` gives ∇_A L at every point. For a batch-mean loss
  L = (1/B)·Σⱼ ℓⱼ, example i's slice of it is (1/B)·Σⱼ ∂ℓⱼ/∂aᵢ: only the
  term j = i with batch norm in eval mode (so ‖∇_A L‖₁ is the mean of the
  per-example norms), every j with batch norm in train mode, whose batch
  statistics couple the examples (docs/method.md §1).

  Args:
    eps: ``{key: array}`` shaped like :func:`activation_shapes`.
    sites: the convention, as in :func:`transform_layer_inputs`: None for
      ``"layer_inputs"``, :func:`tensor_sites` for ``"tensors"`` (the
      gradient then includes every reader's share, the residual add's too).

  Yields:
    Nothing.
  """

  def add(key: str, x: jax.Array) -> jax.Array:
    return x + jnp.asarray(lookup_point(eps, key, "perturbation"), x.dtype)

  with transform_layer_inputs(add, sites=sites):
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
