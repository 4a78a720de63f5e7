"""The VGG-like CIFAR-10 net of BinaryConnect and Relaxed Quantization.

2×128C3 – MP2 – 2×256C3 – MP2 – 2×512C3 – MP2 – 1024FC – 10 (Courbariaux et
al., 2015, with one FC layer as in Louizos et al., 2019), each conv followed
by BN and ReLU.

The 1024FC is followed by BN too (``fc_batch_norm=True``), which neither paper
spells out for this layer: BinaryConnect puts BN after every layer, Relaxed
Quantization implements every layer as conv → BN → quantizer, and here the
input of the last Dense is a quantized activation whose range post-training
quantization reads from the preceding BN's β and γ (Nagel et al., 2019).
Without that BN the range would need data calibration. ``fc_batch_norm=False``
gives Dense (with bias) → ReLU.

At width 1 and 10 classes, on 32×32×3 inputs: 12,979,082 parameters
(4,574,592 conv + 8,388,608 FC + 10,250 head + 5,632 BN).
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

# Channels at width_multiplier 1; "M" is a 2×2 max-pool.
VGG_LAYERS = (128, 128, "M", 256, 256, "M", 512, 512, "M")
VGG_HIDDEN = 1024


def _scaled(features: int, multiplier: float) -> int:
  return max(1, int(round(features * multiplier)))


class VGGLike(nn.Module):
  """VGG-like CIFAR-10 network (see the module docstring).

  Attributes:
    num_classes: number of logits.
    width_multiplier: scales every conv's channels and the FC width (tests
      use small values).
    fc_batch_norm: BN after the 1024FC (then without bias).
    dropout_rate: dropout before each Dense layer; 0 (the default) adds none.
    dtype: compute dtype, or None for that of the inputs and parameters
      (float64 under ``jax_enable_x64``); parameters stay float32, logits
      are at least float32.
  """

  num_classes: int
  width_multiplier: float = 1.0
  fc_batch_norm: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    """Computes logits.

    Args:
      x: NHWC float images (32×32 for CIFAR; any size divisible by 8).
      train: use batch statistics and update ``batch_stats`` (apply with
        ``mutable=["batch_stats"]``), and apply dropout if any.

    Returns:
      Logits ``[B, num_classes]``: float32, or float64 in a float64 model.
    """
    norm = batch_norm(train, self.dtype)
    layers = [
      layer if layer == "M" else _scaled(layer, self.width_multiplier)
      for layer in VGG_LAYERS
    ]
    x = conv_bn_relu_stack(x, layers, conv=conv_no_bias(self.dtype), norm=norm)
    return mlp_classifier(
      x,
      [_scaled(VGG_HIDDEN, self.width_multiplier)],
      self.num_classes,
      norm=norm if self.fc_batch_norm else None,
      dropout_rate=self.dropout_rate,
      train=train,
      dtype=self.dtype,
    )


class TinyVGG(VGGLike):
  """Test-only VGGLike: channels 4/8/16, FC 32 (same code path)."""

  width_multiplier: float = 1 / 32
