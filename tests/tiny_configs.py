"""The tiny digits config the end-to-end tests train (seconds on 2 cores)."""

from configs import digits


def tiny_digits(**overrides):
  """``configs/digits.py`` at width 4, 2 epochs; ``overrides`` use dotted keys."""
  config = digits.get_config()
  config.model_kwargs.width = 4
  config.num_epochs = 2
  config.batch_size = 64
  config.log_every_steps = 1
  config.eval_every_epochs = -1
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config
