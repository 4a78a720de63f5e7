"""The tiny digits config the end-to-end tests train (seconds on 2 cores)."""

from configs import digits


def tiny_digits(**overrides):
  """``configs/digits.py`` at width 4, 2 epochs; ``overrides`` use dotted keys.

  E.g. ``tiny_digits(max_steps=3, **{"reg.kind": "l1"})``.
  """
  config = digits.get_config()
  config.model_kwargs.width = 4
  config.num_epochs = 2
  config.batch_size = 64
  config.log_every_steps = 1
  config.eval_every_epochs = -1
  config.update_from_flattened_dict(overrides)
  return config
