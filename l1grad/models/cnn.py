"""A small BN CNN for scikit-learn's 8×8 digits, the embedded default data.

conv3×3(w) – conv3×3(2w) – MP2 – conv3×3(2w) – flatten – FC(4w) – 10, each
conv and the FC followed by BN and ReLU: the same conv → BN → ReLU pattern as
the CIFAR/ImageNet models, so BN folding and BN-derived activation ranges are
exercised on data that ships with scikit-learn.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from l1grad.models.common import Dtype
from l1grad.models.common import batch_norm
from l1grad.models.common import conv_bn_relu_stack
from l1grad.models.common import conv_no_bias
from l1grad.models.common import mlp_classifier


class DigitsCNN(nn.Module):
  """Small CNN for 8×8×1 digits.

  At ``width=32`` and 10 classes: 188,522 parameters (55,584 conv +
  131,072 FC + 1,290 head + 576 BN).

  Attributes:
    num_classes: number of logits.
    width: channels of the first conv; later convs have ``2 * width``, the
      hidden FC ``4 * width``.
    dtype: compute dtype, or None for that of the inputs and parameters
      (float64 under ``jax_enable_x64``); parameters stay float32, logits
      are at least float32.
  """

  num_classes: int
  width: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    """Computes logits.

    Args:
      x: NHWC float images, 8×8×1 for digits (any even size works).
      train: use batch statistics and update ``batch_stats`` (apply with
        ``mutable=["batch_stats"]``).

    Returns:
      Logits ``[B, num_classes]``: float32, or float64 in a float64 model.
    """
    w = self.width
    norm = batch_norm(train, self.dtype)
    x = conv_bn_relu_stack(
      x, (w, 2 * w, "M", 2 * w), conv=conv_no_bias(self.dtype), norm=norm
    )
    # Flatten rather than average-pool: on a 4×4 map the position of a
    # stroke is most of what tells digits apart.
    return mlp_classifier(
      x,
      [4 * w],
      self.num_classes,
      norm=norm,
      dropout_rate=0.0,
      train=train,
      dtype=self.dtype,
    )
