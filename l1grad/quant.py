"""Uniform symmetric fake quantization of weights and activations.

One pure function, :func:`fake_quant`, serves both post-training quantization
(plain rounding) and straight-through-estimator (STE) training, so the grid a
model is trained against is exactly the grid it is evaluated on. Bit-widths are
traced values: one compiled evaluation function covers a whole bit-width sweep.

Weights: :func:`quantize_kernels` quantizes every kernel of a params tree
(:func:`l1grad.params.is_kernel_path`). Activations:
:func:`quantized_activations` quantizes every activation perturbation point of
:mod:`l1grad.perturb` (the inputs of the Conv/Dense layers but the first),
with fixed ranges or each batch's own. Batch-norm folding, which usually comes first, is in
:mod:`l1grad.fold`. Bin widths as data: :func:`bin_widths` gives the Δ of
every quantized tensor (kernels and activation points, by module path) that
post-training quantization uses, from the same scale functions, jittable.

Conventions (the paper's; written out in docs/method.md §2):

* signed b-bit grid: integers in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (symmetric,
  no ``-2^(b-1)`` code), scale ``max|x| / (2^(b-1) - 1)``;
* unsigned b-bit grid (non-negative activations): ``[0, 2^b - 1]``, scale
  ``max(x) / (2^b - 1)``;
* no +0.5 edge on the range (AQT and Qwix use one; the paper does not).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import contextlib
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from l1grad import fold as fold_lib
from l1grad import perturb
from l1grad import ranges as ranges_lib
from l1grad.params import is_kernel_path
from l1grad.params import split_kernels

__all__ = [
  "BinWidths",
  "activation_bin_widths",
  "activation_scale",
  "bin_widths",
  "dynamic_range",
  "fake_quant",
  "grid_max",
  "kernel_bin_widths",
  "kernel_scale",
  "quantize_activation",
  "quantize_kernels",
  "quantize_to_int",
  "quantized_activations",
  "symmetric_scale",
]


# ---------------------------------------------------------------------------
# The quantizer.
# ---------------------------------------------------------------------------


def grid_max(bits: ArrayLike, *, signed: bool = True) -> jax.Array:
  """Largest integer of the b-bit grid: ``2^(b-1) - 1`` signed, ``2^b - 1`` unsigned.

  Args:
    bits: Bit-width(s), integer-valued; may be a traced integer or float array
      (it is never turned into a Python int, so a sweep over bit-widths needs
      a single compilation).
    signed: Whether the grid is the symmetric signed one.

  Returns:
    A float32 array shaped like ``bits``.
  """
  bits = jnp.asarray(bits, jnp.float32)
  exponent = bits - 1.0 if signed else bits
  # exp2 may be lowered as exp(x·ln 2), which need not be exact at integers;
  # rounding makes the bound an exact integer whatever the backend does.
  return jnp.round(jnp.exp2(exponent)) - 1.0


def _grid_bounds(bits: ArrayLike, signed: bool) -> tuple[jax.Array, jax.Array]:
  hi = grid_max(bits, signed=signed)
  lo = -hi if signed else jnp.zeros_like(hi)
  return lo, hi


def _compute_dtype(x: jax.Array) -> jnp.dtype:
  # Grid arithmetic in at least float32: the integer codes up to 2^b - 1 and
  # x / scale must be represented exactly enough to round correctly.
  return jnp.result_type(x.dtype, jnp.float32)


def _grid_integers(
  x: jax.Array, bits: ArrayLike, scale: ArrayLike, signed: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The one place where values are rounded and clipped onto the grid.

  Shared by :func:`fake_quant` (float path) and :func:`quantize_to_int`
  (integer export) so that both give the same codes bit for bit.

  Returns:
    ``(n, scale, lo, hi)``: grid integers as floats (``clip(round(x/scale))``,
    zero where ``scale == 0``), the scale and the integer bounds, all in the
    compute dtype.
  """
  dtype = _compute_dtype(x)
  x = x.astype(dtype)
  scale = jnp.asarray(scale, dtype)
  lo, hi = _grid_bounds(bits, signed)
  lo, hi = lo.astype(dtype), hi.astype(dtype)
  valid = scale > 0
  # Double-where: a zero scale (all-zero tensor) must give zeros, not
  # 0/0 = NaN, in the value and in any derivative taken through it.
  safe_scale = jnp.where(valid, scale, jnp.ones_like(scale))
  # jnp.round rounds half to even (IEEE default, like np.round): 0.5 → 0,
  # 1.5 → 2, -2.5 → -2. Ties are rare for real data but this is the exact
  # rule that exported integers follow.
  n = jnp.clip(jnp.round(x / safe_scale), lo, hi)
  n = jnp.where(valid, n, jnp.zeros_like(n))
  return n, scale, lo, hi


def fake_quant(
  x: ArrayLike,
  bits: ArrayLike,
  scale: ArrayLike,
  *,
  signed: bool = True,
  ste: bool = False,
) -> jax.Array:
  """Quantizes ``x`` onto a uniform symmetric grid and maps it back to floats.

  ``q = clip(round(x / scale), lo, hi) * scale`` with ``[lo, hi]`` the signed
  grid ``[-(2^(b-1)-1), 2^(b-1)-1]`` or the unsigned grid ``[0, 2^b-1]``.
  Rounding is round-half-to-even (``jnp.round``).

  Args:
    x: Values to quantize.
    bits: Bit-width, integer-valued; may be a traced int or float array so
      that one ``jax.jit`` compilation serves every bit-width. Per-channel
      bit-widths broadcast like ``scale``.
    scale: Bin width Δ (non-negative), broadcasting against ``x``: a scalar
      per tensor, or e.g. shape ``(1, 1, 1, C)`` per channel (see
      :func:`symmetric_scale`). Where ``scale == 0`` the output is 0 (no
      NaN), which is what an all-zero tensor's scale gives.
    signed: Signed symmetric grid (weights, pre-activations) or unsigned grid
      (non-negative activations, e.g. after ReLU).
    ste: Straight-through estimator. The forward value is identical (bit for
      bit) to ``ste=False``; the derivative w.r.t. ``x`` is 1 where ``x`` lies
      inside the clip range ``[lo·scale, hi·scale]`` (bounds included) and 0
      outside, i.e. ``x + stop_gradient(q - x)`` restricted to the range.
      Written with ``stop_gradient`` only (no ``custom_vjp``), so ``jax.jvp``
      and forward-over-reverse (``jax.jvp(jax.grad(f))``) go through it, as
      the regularized training step needs. Without STE the derivative w.r.t.
      ``x`` is zero almost everywhere (rounding is piecewise constant).
      With STE, ``scale`` receives the derivative of the clip (non-zero only
      for clipped values); pass ``jax.lax.stop_gradient(scale)`` for a fixed
      grid.

  Returns:
    The quantized values, same shape as the broadcast of ``x`` and ``scale``,
    in ``x``'s floating dtype.
  """
  x = jnp.asarray(x)
  out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  n, scale_c, lo, hi = _grid_integers(x, bits, scale, signed)
  q = n * scale_c
  if ste:
    xf = x.astype(q.dtype)
    lo_x, hi_x = lo * scale_c, hi * scale_c
    inside = (xf >= lo_x) & (xf <= hi_x)
    # jnp.clip alone would hand a tied bound (the max |x| element, which
    # defines the scale) only half a gradient; take x itself there.
    xc = jnp.where(inside, xf, jnp.clip(xf, lo_x, hi_x))
    # Algebraically xc + stop_gradient(q - xc), but (xc - xc) + q is
    # exactly q in floating point, so STE and PTQ forwards agree bit for bit.
    q = (xc - jax.lax.stop_gradient(xc)) + jax.lax.stop_gradient(q)
  return q.astype(out_dtype)


def quantize_to_int(
  x: ArrayLike, bits: ArrayLike, scale: ArrayLike, *, signed: bool = True
) -> jax.Array:
  """Integer grid codes of ``x`` (the export path), as int32.

  Same rounding and clipping as :func:`fake_quant` (they share one helper):
  ``fake_quant(x, b, s) == quantize_to_int(x, b, s) * s``.

  Args:
    x: Values to quantize.
    bits: Bit-width, integer-valued (traced values allowed).
    scale: Bin width, broadcasting against ``x``; where 0 the codes are 0.
    signed: Signed symmetric grid or unsigned grid.

  Returns:
    int32 codes in ``[-(2^(b-1)-1), 2^(b-1)-1]`` or ``[0, 2^b-1]``.
  """
  n, _, _, _ = _grid_integers(jnp.asarray(x), bits, scale, signed)
  return n.astype(jnp.int32)


def _normalize_axes(axis: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"axis {a} out of range for an array of rank {ndim}")
    out.append(a % ndim)
  return tuple(sorted(set(out)))


def symmetric_scale(
  x: ArrayLike,
  bits: ArrayLike,
  *,
  signed: bool = True,
  axis: int | tuple[int, ...] | None = None,
) -> jax.Array:
  """Bin width of the paper's symmetric quantizer for ``x``.

  ``max|x| / (2^(b-1) - 1)`` signed, ``max(x, 0) / (2^b - 1)`` unsigned (the
  range is clamped at 0: an all-negative tensor quantizes to zeros on the
  unsigned grid). No +0.5 edge (paper convention).

  Args:
    x: The tensor (weights, or calibration activations).
    bits: Bit-width (traced values allowed).
    signed: Signed or unsigned grid.
    axis: ``None`` for one scale per tensor; otherwise the channel axis (or
      axes) that keep their own scale, e.g. ``-1`` for per-output-channel
      Conv/Dense kernels. The maximum is taken over all other axes.

  Returns:
    A scalar (``axis=None``), or an array with the size of ``x`` along
    ``axis`` and 1 elsewhere (keepdims), ready to broadcast against ``x``.
  """
  x = jnp.asarray(x)
  if axis is None:
    reduce_axes = None
  else:
    keep = _normalize_axes(axis, x.ndim)
    reduce_axes = tuple(i for i in range(x.ndim) if i not in keep)
  keepdims = axis is not None
  if signed:
    rmax = jnp.max(jnp.abs(x), axis=reduce_axes, keepdims=keepdims)
  else:
    rmax = jnp.maximum(jnp.max(x, axis=reduce_axes, keepdims=keepdims), 0)
  rmax = rmax.astype(_compute_dtype(x))
  return rmax / grid_max(bits, signed=signed).astype(rmax.dtype)


def quantize_kernels(
  params: Any, bits: ArrayLike, *, per_channel: bool = False, ste: bool = False
) -> Any:
  """Fake-quantizes every ``kernel`` leaf of ``params``; other leaves unchanged.

  Symmetric signed grid, scale ``max|W| / (2^(b-1) - 1)`` per tensor, or per
  output channel (the kernel's last axis, for Conv and Dense alike). Biases
  and batch-norm parameters stay in float: an integer kernel accumulates in
  int32 and adds a float/int32 bias.

  Args:
    params: A params tree (plain, or the ``params`` of folded variables).
    bits: Weight bit-width; may be traced (one compile serves a sweep).
    per_channel: One scale per output channel instead of per tensor.
    ste: Straight-through gradient (quantization-aware training). The scale
      is then held fixed (``stop_gradient``): a fixed grid, as the paper's
      STE.

  Returns:
    The params tree with quantized kernels.
  """

  def quantize(path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
    if not is_kernel_path(path):
      return leaf
    scale = kernel_scale(leaf, bits, per_channel=per_channel)
    if ste:
      scale = jax.lax.stop_gradient(scale)
    return fake_quant(leaf, bits, scale, signed=True, ste=ste)

  return jax.tree_util.tree_map_with_path(quantize, params)


def kernel_scale(
  kernel: ArrayLike, bits: ArrayLike, *, per_channel: bool
) -> jax.Array:
  """The weight scale :func:`quantize_kernels` uses (also used by the export)."""
  return symmetric_scale(
    kernel, bits, signed=True, axis=-1 if per_channel else None
  )


# ---------------------------------------------------------------------------
# Activations.
# ---------------------------------------------------------------------------


def activation_scale(
  bits: ArrayLike, low: ArrayLike, high: ArrayLike
) -> jax.Array:
  """Bin width Δ of an activation whose range is ``[low, high]``.

  A non-negative range (``low >= 0``, e.g. after a ReLU) uses the unsigned
  grid ``[0, 2^b - 1]`` with Δ = ``high / (2^b - 1)``; otherwise the signed
  grid with Δ = ``max(|low|, |high|) / (2^(b-1) - 1)``. Chosen with
  ``jnp.where``, so ranges and bits may be traced values.
  """
  low = jnp.asarray(low, jnp.float32)
  high = jnp.asarray(high, jnp.float32)
  unsigned = jnp.maximum(high, 0.0) / grid_max(bits, signed=False)
  signed = jnp.maximum(jnp.abs(low), jnp.abs(high)) / grid_max(
    bits, signed=True
  )
  return jnp.where(low >= 0, unsigned, signed)


def quantize_activation(
  x: ArrayLike,
  bits: ArrayLike,
  low: ArrayLike,
  high: ArrayLike,
  *,
  ste: bool = False,
) -> jax.Array:
  """Fake-quantizes an activation whose range is ``[low, high]``.

  The grid (unsigned for a non-negative range) and its bin width are those of
  :func:`activation_scale`.

  Args:
    x: the activation.
    bits: bit-width (may be traced).
    low: lower end of the range (scalar).
    high: upper end of the range (scalar).
    ste: straight-through gradient (training) instead of plain rounding.

  Returns:
    The fake-quantized activation, same shape and dtype as ``x``.
  """
  x = jnp.asarray(x)
  scale = activation_scale(bits, low, high)
  xf = x.astype(jnp.float32)
  q = jnp.where(
    jnp.asarray(low) >= 0,
    fake_quant(xf, bits, scale, signed=False, ste=ste),
    fake_quant(xf, bits, scale, signed=True, ste=ste),
  )
  return q.astype(x.dtype)


def dynamic_range(x: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """The batch's own ``(min, max)``, without gradient (STE training ranges)."""
  x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  return jnp.min(x), jnp.max(x)


@contextlib.contextmanager
def quantized_activations(
  bits: ArrayLike,
  ranges: Mapping[str, tuple[ArrayLike, ArrayLike]] | None = None,
  *,
  ste: bool = False,
  point_bits: Mapping[str, ArrayLike] | None = None,
  sites: Mapping[str, str] | None = None,
) -> Iterator[None]:
  """Fake-quantizes every activation perturbation point at ``bits``.

  The points are those of :func:`l1grad.perturb.transform_layer_inputs`, keyed
  by the reading layer's name (``"Block_0/Conv_1"``).

  Args:
    bits: activation bit-width (may be traced: one compile serves a sweep).
    ranges: ``{point: (low, high)}`` fixed ranges (from batch norm or
      calibration). ``None`` uses each batch's own min/max, as STE training
      does.
    ste: straight-through gradients (quantization-aware training).
    point_bits: ``{point: bits}`` for the points quantized at another
      bit-width than ``bits`` (e.g. the last layer's input kept at 8 bits,
      :func:`l1grad.ptq.layer_bits`); may be traced.
    sites: where a point is quantized: None at its Conv/Dense readers (the
      ``"layer_inputs"`` convention), or :func:`l1grad.perturb.tensor_sites`
      (``"tensors"``: once for every reader, a residual add included).

  Yields:
    Nothing; wrap ``model.apply`` (or a loss that calls it) in the context.
  """
  point_bits = dict(point_bits or {})

  def quantize(key: str, x: jax.Array) -> jax.Array:
    if ranges is None:
      low, high = dynamic_range(x)
    else:
      low, high = perturb.lookup_point(ranges, key, "activation range")
    b = point_bits.get(key, bits)
    return quantize_activation(x, b, low, high, ste=ste)

  with perturb.transform_layer_inputs(quantize, sites=sites):
    yield


# ---------------------------------------------------------------------------
# Bin widths as data.
# ---------------------------------------------------------------------------


def kernel_bin_widths(
  params: Any,
  bits: ArrayLike,
  *,
  per_channel: bool = False,
  layer_bits: Mapping[str, ArrayLike] | None = None,
) -> dict[str, jax.Array]:
  """Δ of every kernel of ``params`` (:func:`kernel_scale`, as PTQ uses it).

  Args:
    params: A params tree, plain or folded (``FoldedVariables.params``).
    bits: Weight bit-width (may be traced).
    per_channel: One Δ per output channel (shape ``(1, …, 1, C)``).
    layer_bits: ``{layer: bits}`` for kernels at another bit-width
      (:func:`l1grad.ptq.layer_bits`).

  Returns:
    ``{layer: Δ}``, keyed like :func:`l1grad.params.split_kernels`.
  """
  layer_bits = dict(layer_bits or {})
  kernels = split_kernels(params)[0]
  return {
    name: kernel_scale(k, layer_bits.get(name, bits), per_channel=per_channel)
    for name, k in kernels.items()
  }


def activation_bin_widths(
  ranges: Mapping[str, tuple[ArrayLike, ArrayLike]],
  bits: ArrayLike,
  *,
  point_bits: Mapping[str, ArrayLike] | None = None,
) -> dict[str, jax.Array]:
  """Δ of every activation point with a range (:func:`activation_scale`).

  Args:
    ranges: ``{point: (low, high)}`` (from batch norm or calibration).
    bits: Activation bit-width (may be traced).
    point_bits: ``{point: bits}`` for points at another bit-width.

  Returns:
    ``{point: Δ}`` (float32 scalars), in ``ranges``' order.
  """
  point_bits = dict(point_bits or {})
  return {
    key: activation_scale(point_bits.get(key, bits), low, high)
    for key, (low, high) in ranges.items()
  }


class BinWidths(NamedTuple):
  """The bin widths of a model quantized at (W, A), keyed by module path.

  A pytree of arrays (jit can return it).

  Attributes:
    weights: ``{layer: Δ}`` of each kernel as it is quantized: the folded
      kernel W·a where batch norm is folded (a = γ/√(var + ε) of the running
      statistics), else W; a scalar per tensor, or ``(1, …, 1, C)`` per
      output channel.
    activations: ``{point: Δ}`` of each activation point, scalars.
    fold_scales: ``{layer: a}`` of the folded layers, shape ``(C,)``
      (:func:`l1grad.fold.fold_factors`); empty when not folded.
  """

  weights: dict[str, jax.Array]
  activations: dict[str, jax.Array]
  fold_scales: dict[str, jax.Array]

  def unfolded_weights(self) -> dict[str, jax.Array]:
    """The bin width each element of the *unfolded* kernel W moves on.

    Deploying q(W·a) is the unfolded layer with W replaced by q(W·a)/a: a
    grid of width Δ/|a| along output channel c, so the noise on W is at most
    Δ/(2|a_c|) per element, and the first-order loss change is bounded by
    Σ (Δ/(2|a|))·|∇_W L| (docs/method.md §1.1). For folded layers an array
    that broadcasts against the kernel along its last (output) axis, shape
    ``(C,)`` (``(1, …, 1, C)`` per channel), 0 where a = 0 (the kernel does
    not reach the output); :attr:`weights` as they are for the others.
    """
    out = {}
    for name, delta in self.weights.items():
      a = self.fold_scales.get(name)
      if a is None:
        out[name] = delta
        continue
      a = jnp.abs(a).astype(delta.dtype)
      safe = jnp.where(a > 0, a, jnp.ones_like(a))
      out[name] = jnp.where(a > 0, delta / safe, jnp.zeros_like(a))
    return out

  def point_widths(self) -> dict[str, dict[str, jax.Array]]:
    """Δ shaped like the penalty's point z = ``{"weights", "acts"}``.

    The unfolded kernels' widths (:meth:`unfolded_weights`) and the
    activation points', as :func:`l1grad.expansion.uniform_noise`,
    :func:`l1grad.expansion.hutchinson_curvature` and the other noise
    functions of :mod:`l1grad.expansion` take them for the ``z`` of
    :func:`l1grad.expansion.point_loss`.
    """
    return {"weights": self.unfolded_weights(), "acts": self.activations}


def bin_widths(
  model: nn.Module,
  variables: Mapping[str, Any] | fold_lib.FoldedVariables,
  sample: Any,
  w_bits: ArrayLike,
  a_bits: ArrayLike,
  *,
  ranges: Mapping[str, tuple[ArrayLike, ArrayLike]] | None = None,
  folded: bool = True,
  per_channel: bool = False,
  pairs: Mapping[Any, Any] | None = None,
  layer_bits: Mapping[str, ArrayLike] | None = None,
  point_bits: Mapping[str, ArrayLike] | None = None,
  apply_kwargs: Mapping[str, Any] = ranges_lib.EVAL_KWARGS,
) -> BinWidths:
  """The Δ of every kernel and activation point, as PTQ would quantize them.

  The same code as post-training quantization: batch norm folded with the
  running statistics by :func:`l1grad.fold.fold_batch_norm` (``folded``),
  the kernels' Δ by :func:`kernel_scale`, the activations' by
  :func:`activation_scale` from ``ranges``, or, when None, from the
  Data-Free Quantization ranges of the current BN parameters
  (:func:`l1grad.ranges.dfq_activation_ranges`, PTQ's ``--act_ranges bn``,
  computed under jit). So ``fake_quant(W_folded, w_bits, Δ)`` is the kernel
  the evaluator runs, bit for bit, when both fold alike: XLA may round a
  fold computed inside ``jit`` an ulp away from PTQ's (which folds outside
  it), and Δ with it; pass the evaluator's own folded variables to get its
  Δ exactly.

  Pure and jittable (bit-widths and variables may be traced). Δ is
  differentiable where it is a function of the variables (the kernels' max);
  a caller that uses it as a weight wraps it in ``jax.lax.stop_gradient``.
  The DFQ ranges carry no gradient. They are only meaningful for points
  computed from batch-norm outputs: check a model once with
  :func:`l1grad.ranges.bn_activation_ranges` (which raises otherwise), or
  pass calibrated ``ranges``.

  Args:
    model: The linen model.
    variables: Its unfolded variables (``params``, ``batch_stats``), or
      variables already folded (:class:`l1grad.fold.FoldedVariables`, e.g.
      a prepared run's ``eval_variables``): their kernels are used as they
      are, ``ranges`` must be given (DFQ needs the batch norms) and
      ``fold_scales`` is empty.
    sample: An input batch, or a ``jax.ShapeDtypeStruct`` of one: only its
      per-example shape and dtype are used.
    w_bits: Weight bit-width (may be traced).
    a_bits: Activation bit-width (may be traced).
    ranges: ``{point: (low, high)}``, e.g. calibrated; None: DFQ.
    folded: Fold batch norm first, as PTQ does by default.
    per_channel: Per-output-channel weight Δ.
    pairs: The Conv/Dense → BatchNorm pairs
      (:func:`l1grad.fold.find_conv_bn_pairs`), found by tracing the model
      when None.
    layer_bits: ``{layer: bits}`` (:func:`l1grad.ptq.layer_bits`).
    point_bits: ``{point: bits}`` (:func:`l1grad.ptq.layer_bits`).
    apply_kwargs: Evaluation-mode arguments of ``model.apply``.

  Returns:
    :class:`BinWidths` (its :meth:`BinWidths.unfolded_weights` maps the
    folded kernels' Δ onto the unfolded kernels).
  """
  example = jnp.zeros((1, *sample.shape[1:]), sample.dtype)
  if isinstance(variables, fold_lib.FoldedVariables):
    if ranges is None:
      raise ValueError(
        "bin_widths of folded variables needs ranges: the DFQ rule reads the"
        " batch norms, which folding removed. Pass the unfolded variables,"
        " or the ranges (e.g. a prepared run's)."
      )
    return BinWidths(
      weights=kernel_bin_widths(
        variables.params, w_bits, per_channel=per_channel, layer_bits=layer_bits
      ),
      activations=activation_bin_widths(ranges, a_bits, point_bits=point_bits),
      fold_scales={},
    )
  variables = {k: v for k, v in variables.items() if v}
  if not folded:
    pairs = {}
  elif pairs is None:
    pairs = fold_lib.find_conv_bn_pairs(
      model, variables, example, **dict(apply_kwargs)
    )
  params = variables["params"]
  scales = {}
  if pairs:
    params = fold_lib.fold_batch_norm(variables, pairs).params
    scales = {
      name: f.scale
      for name, f in fold_lib.fold_factors(variables, pairs).items()
    }
  if ranges is None:
    ranges = ranges_lib.dfq_activation_ranges(
      model,
      variables,
      tuple(example.shape[1:]),
      example.dtype,
      apply_kwargs=apply_kwargs,
    )
  return BinWidths(
    weights=kernel_bin_widths(
      params, w_bits, per_channel=per_channel, layer_bits=layer_bits
    ),
    activations=activation_bin_widths(ranges, a_bits, point_bits=point_bits),
    fold_scales=scales,
  )


# Batch-norm folding lived here before l1grad.fold; the old names still work.
_MOVED_TO_FOLD = (
  "BatchNormLink",
  "FoldedVariables",
  "ModulePath",
  "find_conv_bn_pairs",
  "fold_batch_norm",
  "folded_apply",
)


def __getattr__(name: str) -> Any:
  if name in _MOVED_TO_FOLD:
    from l1grad import fold  # pylint: disable=g-import-not-at-top

    return getattr(fold, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
