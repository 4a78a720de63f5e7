"""ResNet v1 with basic blocks: ResNet-18 for CIFAR-10 and for ImageNet.

One implementation, :class:`ResNet`, after flax ``examples/imagenet/models.py``;
the named variants only change field defaults:

* :class:`ResNet18ImageNet`: 7×7/2 stem, BN, ReLU, 3×3/2 max-pool, basic
  blocks [2, 2, 2, 2] with 64/128/256/512 filters; torchvision's
  ``resnet18`` layer for layer (11,689,512 parameters at 1000 classes).
* :class:`ResNet18CIFAR`: 3×3/1 stem and no max-pool, the usual CIFAR
  adaptation (11,173,962 parameters at 10 classes).
* :class:`TinyResNet`: test-only, one block per stage, two stages, 8 filters;
  same code path (both stems, projection shortcut, stride 2).

Paddings are written out as PyTorch's (1 for 3×3, 3 for 7×7, 0 for 1×1): at
stride 2 on an even size, "SAME" pads (0, 1) where PyTorch pads (1, 1), and
matching PyTorch (which the paper used) lets torchvision's pretrained
ResNet-18 be ported, e.g. to fine-tune it with the penalty.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from l1grad.models.common import Dtype
from l1grad.models.common import ModuleDef
from l1grad.models.common import batch_norm
from l1grad.models.common import conv_no_bias
from l1grad.models.common import logits_float32

Stem = Literal["imagenet", "cifar"]
STEMS = ("imagenet", "cifar")


class ResNetBlock(nn.Module):
  """Basic residual block: two 3×3 conv → BN, projection when shapes change.

  Attributes:
    filters: output channels of both convs.
    conv: conv constructor (no bias: each conv feeds a batch norm).
    norm: batch norm constructor.
    act: activation.
    strides: strides of the first conv and of the projection.
    zero_init_residual: start the second BN's γ at 0, so the block starts as
      the identity (Goyal et al., 2017). Off by default, as in torchvision.
  """

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable[[jax.Array], jax.Array] = nn.relu
  strides: tuple[int, int] = (1, 1)
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block.

    Args:
      x: NHWC input.

    Returns:
      NHWC output with ``filters`` channels, spatially divided by ``strides``.
    """
    y = self.conv(self.filters, (3, 3), self.strides, padding=1)(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3), padding=1)(y)
    scale_init = (
      nn.initializers.zeros_init()
      if self.zero_init_residual
      else nn.initializers.ones_init()
    )
    y = self.norm(scale_init=scale_init)(y)

    residual = x
    if residual.shape != y.shape:
      # The projection reads the very same array as the first conv: the
      # perturbation code recognises it by identity as one activation, the
      # way hardware would quantize it once.
      residual = self.conv(
        self.filters, (1, 1), self.strides, padding=0, name="conv_proj"
      )(x)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  """ResNet v1 with basic blocks (conv → BN → ReLU everywhere).

  Attributes:
    num_classes: number of logits.
    stage_sizes: blocks per stage; stage ``i`` has ``num_filters * 2**i``
      filters and, for ``i > 0``, starts with a stride-2 block.
    num_filters: filters of the stem and of the first stage.
    stem: ``"imagenet"`` (7×7/2 conv, BN, ReLU, 3×3/2 max-pool) or
      ``"cifar"`` (3×3/1 conv, BN, ReLU, no pooling).
    zero_init_residual: see :class:`ResNetBlock`.
    dtype: compute dtype (e.g. ``jnp.bfloat16``), or None for that of the
      inputs and parameters (float64 under ``jax_enable_x64`` with float64
      inputs and parameters, for higher-order checks); parameters stay
      float32, logits are at least float32.
  """

  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  num_filters: int = 64
  stem: Stem = "imagenet"
  zero_init_residual: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    """Computes logits.

    Args:
      x: NHWC float images.
      train: use batch statistics and update ``batch_stats`` (apply with
        ``mutable=["batch_stats"]``); False uses the running averages.

    Returns:
      Logits ``[B, num_classes]``: float32, or float64 in a float64 model.
    """
    conv = conv_no_bias(self.dtype)
    norm = batch_norm(train, self.dtype)

    if self.stem == "imagenet":
      x = conv(self.num_filters, (7, 7), (2, 2), padding=3, name="conv_init")(x)
      x = norm(name="bn_init")(x)
      x = nn.relu(x)
      # Max-pool pads with -inf, so padding 1 matches torchvision's MaxPool2d.
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == "cifar":
      x = conv(self.num_filters, (3, 3), padding=1, name="conv_init")(x)
      x = norm(name="bn_init")(x)
      x = nn.relu(x)
    else:
      raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")

    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = ResNetBlock(
          self.num_filters * 2**i,
          conv=conv,
          norm=norm,
          strides=strides,
          zero_init_residual=self.zero_init_residual,
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return logits_float32(x)


class ResNet18ImageNet(ResNet):
  """Standard ImageNet ResNet-18 (torchvision ``resnet18``).

  11,689,512 parameters at 1000 classes (BN scale and bias included, running
  statistics not), torchvision's count.
  """

  num_classes: int = 1000


class ResNet18CIFAR(ResNet):
  """ResNet-18 for 32×32 inputs: 3×3/1 stem conv, no max-pool.

  11,173,962 parameters at 10 classes.
  """

  stem: Stem = "cifar"


class TinyResNet(ResNet):
  """Test-only ResNet, like flax's ``_ResNet1``: one block per stage.

  Two stages so that the stride-2 block and its projection shortcut run;
  the stem is a field, so tests cover both stems with the ResNet-18 code.
  """

  stage_sizes: Sequence[int] = (1, 1)
  num_filters: int = 8
  stem: Stem = "cifar"
