"""Models of the paper's experiments, and tiny ones for tests.

Every model is a ``flax.linen`` Module called as ``model.apply(variables, x,
train=...)`` on NHWC float images and returns float32 logits
``[B, num_classes]``. The library relies on these conventions:

* every weight is the ``kernel`` of a plain ``nn.Conv`` / ``nn.Dense``
  submodule (found by name, intercepted with ``nn.intercept_methods``);
* a batch norm directly follows the Conv/Dense it normalises, which then has no
  bias (conv → BN → ReLU), so BN can be folded into the kernel before
  quantization and activation ranges read from β and γ;
* ``train=True`` needs ``mutable=["batch_stats"]``; no dropout by default.

Use :func:`get_model` to build one by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from l1grad.models.cnn import DigitsCNN
from l1grad.models.resnet import (
    ResNet,
    ResNet18CIFAR,
    ResNet18ImageNet,
    ResNetBlock,
    TinyResNet,
)
from l1grad.models.vgg import TinyVGG, VGGLike

_REGISTRY: dict[str, type[nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "vgg_like": VGGLike,
    "resnet18_cifar": ResNet18CIFAR,
    "resnet18_imagenet": ResNet18ImageNet,
    "tiny_resnet": TinyResNet,
    "tiny_vgg": TinyVGG,
}
MODEL_NAMES = tuple(_REGISTRY)


def get_model(name: str, *, num_classes: int, **overrides: Any) -> nn.Module:
  """Builds a model by name.

  Args:
    name: one of ``MODEL_NAMES``: ``"digits_cnn"``, ``"vgg_like"``,
      ``"resnet18_cifar"``, ``"resnet18_imagenet"``, ``"tiny_resnet"``,
      ``"tiny_vgg"``.
    num_classes: number of logits.
    **overrides: dataclass fields of the model class (e.g. ``width=16``,
      ``width_multiplier=0.5``, ``dtype=jnp.bfloat16``).

  Returns:
    The unbound module.

  Raises:
    ValueError: unknown ``name``.
    TypeError: an override that is not a field of the model; the message lists
      the valid fields.
  """
  try:
    cls = _REGISTRY[name]
  except KeyError:
    raise ValueError(
        f"Unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}"
    ) from None
  fields = {
      f.name
      for f in dataclasses.fields(cls)
      if f.name not in ("parent", "name", "num_classes")
  }
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(
        f"{cls.__name__} has no field(s) {unknown}; valid: {sorted(fields)}"
    )
  return cls(num_classes=num_classes, **overrides)


__all__ = [
    "MODEL_NAMES",
    "DigitsCNN",
    "ResNet",
    "ResNet18CIFAR",
    "ResNet18ImageNet",
    "ResNetBlock",
    "TinyResNet",
    "TinyVGG",
    "VGGLike",
    "get_model",
]
