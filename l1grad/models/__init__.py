"""Models of the paper's experiments, and tiny ones for tests.

Every model is a ``flax.linen`` Module called as ``model.apply(variables, x,
train=...)`` on NHWC float images and returns float32 logits
``[B, num_classes]`` (``dtype=None`` makes a model compute in its inputs' and
parameters' dtype: float64 ones under ``jax_enable_x64`` give float64
logits, for higher-order derivative checks). The library relies on these
conventions:

* every weight is the ``kernel`` of a plain ``nn.Conv`` / ``nn.Dense``
  submodule (found by name, intercepted with ``nn.intercept_methods``);
* a batch norm directly follows the Conv/Dense it normalises, which then has no
  bias (conv → BN → ReLU), so BN can be folded into the kernel before
  quantization and activation ranges read from β and γ;
* ``train=True`` needs ``mutable=["batch_stats"]``; no dropout by default.

Use :func:`get_model` to build one by name, or :func:`from_config` to build
the one a training config names.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax.numpy as jnp

from l1grad.models.cnn import DigitsCNN
from l1grad.models.resnet import ResNet
from l1grad.models.resnet import ResNet18CIFAR
from l1grad.models.resnet import ResNet18ImageNet
from l1grad.models.resnet import ResNetBlock
from l1grad.models.resnet import TinyResNet
from l1grad.models.vgg import TinyVGG
from l1grad.models.vgg import VGGLike

if TYPE_CHECKING:
  import ml_collections

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


def from_config(
  config: ml_collections.ConfigDict, num_classes: int
) -> nn.Module:
  """The model a training config describes.

  ``config.model`` built by :func:`get_model` with ``config.model_kwargs`` as
  overrides, and ``dtype=config.compute_dtype`` unless that is float32 (the
  models' default).

  ``num_classes`` is an argument, not read from the dataset: the class count
  belongs to the data pipeline, which this package of plain Flax modules does
  not import (``l1grad.train.create_model`` looks it up when not given).

  Args:
    config: A training config (``configs/*.py``).
    num_classes: Number of logits.

  Returns:
    The unbound module.

  Raises:
    ValueError: unknown ``config.model``.
    TypeError: a ``config.model_kwargs`` entry that is not a field of the
      model.
  """
  kwargs = config_kwargs(config)
  if "dtype" in kwargs:
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  return get_model(config.model, num_classes=num_classes, **kwargs)


def config_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The keyword arguments :func:`from_config` passes to :func:`get_model`.

  Plain JSON values (the compute dtype by name), so an export's manifest can
  store them and rebuild the same model.
  """
  model_kwargs = config.get("model_kwargs", None)
  kwargs = json.loads(model_kwargs.to_json()) if model_kwargs else {}
  if config.get("compute_dtype", "float32") != "float32":
    kwargs["dtype"] = str(config.compute_dtype)
  return kwargs


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
  "config_kwargs",
  "from_config",
  "get_model",
]
