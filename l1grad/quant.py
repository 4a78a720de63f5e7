"""Uniform symmetric fake quantization and batch-norm folding.

One pure function, :func:`fake_quant`, serves both post-training quantization
(plain rounding) and straight-through-estimator (STE) training, so the grid a
model is trained against is exactly the grid it is evaluated on. Bit-widths are
traced values: one compiled evaluation function covers a whole bit-width sweep.

Batch-norm folding works on any Flax linen model without edits: the Conv/Dense
→ BatchNorm pairs are discovered by tracing the model with
:func:`flax.linen.intercept_methods`, and the folded model is run through the
same mechanism, so it composes with other interceptors (e.g. the one that
fake-quantizes layer inputs during post-training quantization).

Conventions (DESIGN.md §2, the paper's):

* signed b-bit grid: integers in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (symmetric,
  no ``-2^(b-1)`` code), scale ``max|x| / (2^(b-1) - 1)``;
* unsigned b-bit grid (non-negative activations): ``[0, 2^b - 1]``, scale
  ``max(x) / (2^b - 1)``;
* no +0.5 edge on the range (AQT and Qwix use one; the paper does not).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from l1grad.regularizers import is_kernel_path

__all__ = [
    "BatchNormLink",
    "FoldedVariables",
    "fake_quant",
    "kernel_scale",
    "quantize_kernels",
    "find_conv_bn_pairs",
    "fold_batch_norm",
    "folded_apply",
    "grid_max",
    "quantize_to_int",
    "symmetric_scale",
]

ModulePath = tuple[str, ...]


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
            is then held fixed (``stop_gradient``): a fixed grid, as the paper's STE.

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


def kernel_scale(kernel: ArrayLike, bits: ArrayLike, *, per_channel: bool) -> jax.Array:
    """The weight scale :func:`quantize_kernels` uses (also used by the export)."""
    return symmetric_scale(kernel, bits, signed=True, axis=-1 if per_channel else None)


# ---------------------------------------------------------------------------
# Batch-norm folding.
# ---------------------------------------------------------------------------


class BatchNormLink(NamedTuple):
    """The batch norm that follows a Conv/Dense layer.

    Attributes:
      path: The BatchNorm module's path, e.g. ``('Block_0', 'BatchNorm_0')``.
      epsilon: Its ``epsilon`` attribute (needed to fold ``1/sqrt(var + eps)``).
    """

    path: ModulePath
    epsilon: float


def _first_input(args: tuple[Any, ...], kwargs: Mapping[str, Any], name: str) -> Any:
    if args:
        return args[0]
    return kwargs.get(name)


def _is_linear(module: nn.Module) -> bool:
    # Exact layer classes whose kernel's last axis is the output feature axis
    # and whose output the interceptor sees; subclasses keep that contract.
    return isinstance(module, (nn.Conv, nn.Dense))


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
      model: Any linen model built from ``nn.Conv``/``nn.Dense``/``nn.BatchNorm``.
      variables: Its variables (``{'params': ..., 'batch_stats': ...}``).
      *args: Positional arguments of ``model.apply`` (e.g. a batch; only its
        shape and dtype matter).
      **kwargs: Keyword arguments of ``model.apply`` (e.g. ``train=False``).

    Returns:
      ``{layer_path: BatchNormLink(bn_path, epsilon)}``, paths as tuples of
      module names, e.g. ``{('Conv_0',): BatchNormLink(('BatchNorm_0',), 1e-5)}``.
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
            ndim = getattr(x, "ndim", 0)
            channel_last = ndim > 0 and _normalize_axes(module.axis, ndim) == (ndim - 1,)
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
    """Variables of a model whose batch norms are folded into the layers before them.

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
    pairs: Mapping[ModulePath, BatchNormLink] = flax.struct.field(pytree_node=False)


def _get(tree: Mapping[str, Any], path: ModulePath) -> Mapping[str, Any]:
    for name in path:
        tree = tree[name]
    return tree


def _pop(tree: dict[str, Any], path: ModulePath) -> Any:
    """Removes ``tree[path]``; prunes parents left empty."""
    if not path:
        return None
    head, *rest = path
    if head not in tree:
        return None
    if not rest:
        return tree.pop(head)
    out = _pop(tree[head], tuple(rest))
    if not tree[head]:
        del tree[head]
    return out


def _unfreeze(tree: Any) -> Any:
    # Plain nested dicts, copied: folding must not alter the caller's tree.
    if isinstance(tree, Mapping):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree


def fold_batch_norm(
    variables: Mapping[str, Any], pairs: Mapping[ModulePath, BatchNormLink]
) -> FoldedVariables:
    """Folds each paired BatchNorm into the Conv/Dense layer before it.

    With ``a = γ / sqrt(var + ε)`` per channel (γ = 1 without a scale param,
    β = 0 without a bias param), ``BN(x·W + b) = x·(W·a) + ((b - μ)·a + β)``:
    the kernel is scaled along its last (output-feature) axis, and the bias
    replaced, or, for a layer without a bias param, kept aside in
    ``FoldedVariables.biases``. Arithmetic is done in float32 at least, results
    are cast back to the kernel's dtype.

    Args:
      variables: ``{'params': ..., 'batch_stats': ..., ...}`` of the model.
      pairs: From :func:`find_conv_bn_pairs`.

    Returns:
      The folded variables; the folded BatchNorms' own variables are dropped
      (they are no longer needed).
    """
    variables = _unfreeze(variables)
    params = variables.pop("params")
    state = variables
    biases: dict[ModulePath, jax.Array] = {}
    for layer_path, link in pairs.items():
        layer = _get(params, layer_path)
        bn_params = _get(params, link.path) if _has(params, link.path) else {}
        stats = _get(state["batch_stats"], link.path)
        kernel = jnp.asarray(layer["kernel"])
        dtype = jnp.result_type(kernel.dtype, jnp.float32)
        mean = jnp.asarray(stats["mean"], dtype)
        var = jnp.asarray(stats["var"], dtype)
        gamma = jnp.asarray(bn_params.get("scale", 1.0), dtype)
        beta = jnp.asarray(bn_params.get("bias", 0.0), dtype)
        a = gamma * jax.lax.rsqrt(var + jnp.asarray(link.epsilon, dtype))
        layer["kernel"] = (kernel.astype(dtype) * a).astype(kernel.dtype)
        if "bias" in layer:
            b = jnp.asarray(layer["bias"])
            layer["bias"] = ((b.astype(dtype) - mean) * a + beta).astype(b.dtype)
        else:
            biases[layer_path] = ((-mean) * a + beta).astype(kernel.dtype)
        _pop(params, link.path)
        for collection in state.values():
            if isinstance(collection, dict):
                _pop(collection, link.path)
    return FoldedVariables(
        params=params,
        biases=biases,
        state={name: c for name, c in state.items() if c},
        pairs=flax.core.FrozenDict(pairs),
    )


def _has(tree: Mapping[str, Any], path: ModulePath) -> bool:
    for name in path:
        if not isinstance(tree, Mapping) or name not in tree:
            return False
        tree = tree[name]
    return True


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
        return model.apply({"params": folded.params, **folded.state}, *args, **kwargs)
