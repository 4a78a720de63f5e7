"""STE quantization-aware training: the forward pass it simulates.

``config.qat.bits = "W:A"`` trains with the straight-through estimator (STE)
through the one fake-quantizer (:func:`l1grad.quant.fake_quant`,
``ste=True``). ``config.qat.scheme`` says what is quantized
(docs/method.md §4):

* ``"folded"`` (the default): what post-training quantization evaluates and an
  integer deployment computes. Every Conv/Dense kernel followed by a batch norm
  is quantized *folded*, ``q(W·a)`` with ``a = γ/sqrt(var_run + ε)`` (the
  running statistics, per output channel, as :func:`l1grad.fold.fold_batch_norm`
  folds them), on the per-tensor grid of the folded kernel; the activations
  are quantized on fixed ranges from the current BN parameters by the
  Data-Free Quantization rule (:func:`l1grad.ranges.dfq_activation_ranges`, the
  function PTQ's ``--act_ranges bn`` uses). While batch norm still learns its
  statistics, the layer computes ``BN_train(conv(x, q(W·a)/a))``: the weight
  grid is the deployed one and the normalisation uses the batch statistics of
  the quantized convolution (which the running statistics track, so the
  folded bias corrects the mean shift quantization causes). For the last
  ``qat.freeze_bn_fraction`` of the steps (default -1: all of a fine-tune,
  the last fifth from scratch, :func:`freeze_fraction`) the statistics are
  frozen and the forward pass *is* the PTQ forward pass: ``fold.fold_batch_norm``,
  ``quant.quantize_kernels`` and ``fold.folded_apply`` with quantized
  activations, the same functions with STE gradients. In float (no
  quantization) the batch-statistics phase is exactly
  ``BN_train(conv(x, W))``.
* ``"unfolded"``: the unfolded kernels quantized, batch norm in float, the
  activations on each batch's own min/max (the scheme before the folded one;
  kept for comparison).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from l1grad import bits as bits_lib
from l1grad import errors
from l1grad import fold
from l1grad import quant
from l1grad import ranges as ranges_lib
from l1grad.params import is_kernel_path
from l1grad.params import layer_name

__all__ = [
  "SCHEMES",
  "FoldedSTE",
  "AUTO_FREEZE",
  "bn_freeze_step",
  "folded_kernels",
  "freeze_fraction",
  "freeze_start",
  "from_config",
]

PyTree = Any
Pair = tuple[int, int]
Ranges = dict[str, tuple[jax.Array, jax.Array]]

SCHEMES = ("folded", "unfolded")


def freeze_start(total_steps: int, fraction: float) -> int:
  """The first step whose batch norm is frozen: the last ``fraction`` of the
  ``total_steps`` (rounded to whole steps) run with the running statistics.
  """
  return int(total_steps) - int(round(float(fraction) * int(total_steps)))


# qat.freeze_bn_fraction = -1: every step of a fine-tune (its batch norm
# already holds a trained model's statistics), the last fifth from scratch.
AUTO_FREEZE = {True: 1.0, False: 0.2}


def freeze_fraction(config: Any) -> float:
  """``config.qat.freeze_bn_fraction``, with -1 resolved (:data:`AUTO_FREEZE`)."""
  fraction = float(config.qat.freeze_bn_fraction)
  if fraction == -1:
    return AUTO_FREEZE[bool(config.init_from)]
  return fraction


def bn_freeze_step(config: Any, total_steps: int) -> int | None:
  """The training config's first frozen-BN step; None unless folded STE."""
  if not config.qat.bits or config.qat.scheme != "folded":
    return None
  return freeze_start(total_steps, freeze_fraction(config))


def from_config(
  model: nn.Module, config: Any
) -> Callable[[tuple[int, ...], Any], FoldedSTE] | None:
  """The training config's folded STE scheme; None unless it is on.

  Returns:
    ``(example_shape, dtype) -> FoldedSTE``: the scheme for inputs of that
    shape (built once per shape, :meth:`FoldedSTE.create`; the trainer calls
    it with its batch's shape, outside the gradient penalty).
  """
  if not config.qat.bits or config.qat.scheme != "folded":
    return None
  bits = bits_lib.parse_pair(config.qat.bits)

  def for_inputs(example_shape: tuple[int, ...], dtype: Any) -> FoldedSTE:
    return FoldedSTE.create(model, bits, example_shape, dtype)

  return for_inputs


def folded_kernels(
  params: PyTree,
  batch_stats: PyTree,
  pairs: Any,
  bits: ArrayLike,
  *,
  quantize: bool = True,
) -> PyTree:
  """Kernels quantized on the folded grid and mapped back to the unfolded layer.

  Each paired kernel becomes ``q(W·a)/a`` with ``a = γ/sqrt(var_run + ε)``
  (:func:`l1grad.fold.fold_factors`, held fixed: no gradient flows through
  ``a``), every other kernel ``q(W)``; ``q`` is
  :func:`l1grad.quant.quantize_kernels` with STE, per tensor. A layer whose
  ``a`` is 0 keeps ``W`` (its batch norm outputs β whatever the kernel).

  Args:
    params: The unfolded params.
    batch_stats: The running statistics.
    pairs: From :func:`l1grad.fold.find_conv_bn_pairs`.
    bits: Weight bit-width (may be traced).
    quantize: ``False`` skips ``q`` (``W·a/a``: the float reference).

  Returns:
    The params with the kernels replaced.
  """
  factors = fold.fold_factors(
    jax.lax.stop_gradient({"params": params, "batch_stats": batch_stats}),
    pairs,
  )

  def scale_of(path: tuple[Any, ...]) -> jax.Array | None:
    if not is_kernel_path(path):
      return None
    found = factors.get(layer_name(path[:-1]))
    return None if found is None else found.scale

  def to_folded(path, leaf):
    a = scale_of(path)
    return leaf if a is None else (leaf * a).astype(leaf.dtype)

  scaled = jax.tree_util.tree_map_with_path(to_folded, params)
  if quantize:
    scaled = quant.quantize_kernels(scaled, bits, ste=True)

  def to_unfolded(path, leaf, original):
    a = scale_of(path)
    if a is None:
      return leaf
    safe = jnp.where(a == 0, jnp.ones_like(a), a)
    return jnp.where(a == 0, original, leaf / safe).astype(original.dtype)

  return jax.tree_util.tree_map_with_path(to_unfolded, scaled, params)


@dataclasses.dataclass(frozen=True)
class FoldedSTE:
  """The ``"folded"`` scheme for one model at one ``(W, A)``.

  Build it with :meth:`create`. :meth:`ranges` gives the activation ranges
  (traced; the trainer computes them outside the gradient penalty's
  perturbation, which must not see their forward pass), :meth:`apply` the
  training forward pass.

  Attributes:
    model: The linen model.
    bits: ``(weight bits, activation bits)``.
    pairs: The Conv/Dense → BatchNorm pairs
      (:func:`l1grad.fold.find_conv_bn_pairs`).
    example_shape: One input example's shape.
    dtype: The input dtype.
  """

  model: nn.Module
  bits: Pair
  pairs: Any
  example_shape: tuple[int, ...]
  dtype: Any = jnp.float32

  @classmethod
  def create(
    cls,
    model: nn.Module,
    bits: Pair,
    example_shape: tuple[int, ...],
    dtype: Any = jnp.float32,
  ) -> FoldedSTE:
    """Finds the pairs and checks that the scheme applies to ``model``.

    Cached per model, bits and input shape. May be called while a function
    is traced (e.g. from the batch's shape inside ``jax.jit``): the checks
    run eagerly on stand-in values. Not inside another interceptor of the
    layers, such as the gradient penalty's perturbation: the trainer builds
    it in the train step, outside the penalty.

    Raises:
      errors.ConfigError: A batch norm does not directly follow a Conv/Dense
        (it cannot be folded), or a quantized activation is not computed
        from batch-norm outputs only (no Data-Free Quantization range).
    """
    with jax.ensure_compile_time_eval():
      return _create(
        model,
        tuple(int(b) for b in bits),
        tuple(int(d) for d in example_shape),
        jnp.dtype(dtype).name,
      )

  def ranges(self, params: PyTree, batch_stats: PyTree) -> Ranges:
    """The activation ranges PTQ's ``--act_ranges bn`` gives these params."""
    return ranges_lib.dfq_activation_ranges(
      self.model,
      {"params": params, "batch_stats": batch_stats},
      self.example_shape,
      self.dtype,
    )

  def apply(
    self,
    params: PyTree,
    batch_stats: PyTree,
    images: ArrayLike,
    *,
    act_ranges: Ranges | None = None,
    bn_frozen: bool = False,
    rngs: Any = None,
  ) -> tuple[jax.Array, PyTree]:
    """The training forward pass, ``(logits, new batch_stats)``.

    Args:
      params: The unfolded params (what the optimizer updates).
      batch_stats: The running statistics.
      images: A training batch.
      act_ranges: From :meth:`ranges`; computed here when None.
      bn_frozen: Static. False: batch norm in train mode on the quantized
        convolution (batch statistics, running statistics updated). True:
        the PTQ forward pass (folded with the running statistics, which stay
        as they are).
      rngs: ``model.apply``'s rngs (dropout).
    """
    w_bits, a_bits = self.bits
    if act_ranges is None:
      act_ranges = self.ranges(params, batch_stats)
    act_ranges = jax.lax.stop_gradient(act_ranges)
    with quant.quantized_activations(a_bits, act_ranges, ste=True):
      if bn_frozen:
        folded = fold.fold_batch_norm(
          {"params": params, "batch_stats": batch_stats}, self.pairs
        )
        folded = folded.replace(
          params=quant.quantize_kernels(folded.params, w_bits, ste=True)
        )
        logits = fold.folded_apply(
          self.model, folded, images, train=True, rngs=rngs
        )
        return logits, batch_stats
      applied = folded_kernels(params, batch_stats, self.pairs, w_bits)
      logits, updates = self.model.apply(
        {"params": applied, "batch_stats": batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
        rngs=rngs,
      )
      return logits, updates["batch_stats"]


@functools.lru_cache(maxsize=16)
def _create(
  model: nn.Module,
  bits: Pair,
  example_shape: tuple[int, ...],
  dtype_name: str,
) -> FoldedSTE:
  dtype = jnp.dtype(dtype_name)
  sample = jnp.zeros((1, *example_shape), dtype)
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), sample, train=False)
  )
  # Ones: a concrete stand-in, enough to find pairs and check the ranges'
  # derivation (both depend on the graph, not on the values).
  variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), abstract)
  pairs = fold.find_conv_bn_pairs(model, variables, sample, train=False)
  folded_bns = {link.path for link in pairs.values()}
  stats = traverse_util.flatten_dict(variables.get("batch_stats", {}))
  unpaired = sorted(
    {layer_name(path[:-1]) for path in stats}
    - {layer_name(p) for p in folded_bns}
  )
  if unpaired:
    raise errors.ConfigError(
      "config.qat.scheme: 'folded' folds every batch norm into the Conv/Dense"
      f" before it, but {', '.join(unpaired)} does not directly follow one."
      " Use config.qat.scheme=unfolded."
    )
  try:
    ranges_lib.bn_activation_ranges(model, variables, sample)
  except errors.UserError as e:
    raise errors.ConfigError(
      "config.qat.scheme: 'folded' takes its activation ranges from batch"
      f" norm, which this model does not allow ({e}). Use"
      " config.qat.scheme=unfolded."
    ) from None
  return FoldedSTE(model, bits, pairs, example_shape, dtype)
