"""Base study config: every field ``study.py`` reads, with its meaning.

Not meant to be run on its own; the study configs beside it import it and
patch a few fields. Any field can be overridden on the command line, e.g.
``--config.seeds=0 --config.base_epochs=1`` or, for the trainer config the
runs start from, ``--config.train.batch_size=64``.
"""

import ml_collections


def get_config(train: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The study around ``train``, the trainer config of its base model."""
  config = ml_collections.ConfigDict()
  config.name = train.dataset
  # The base run's trainer config (a config of configs/); every run of the
  # study is this config with the study's fields patched in.
  config.train = train
  # Validation images held out of the training split (stratified), on which λ
  # is chosen; the test split is only read by the final PTQ sweep.
  config.train.minival_examples = 5000
  config.seeds = (0, 1, 2)
  config.base_epochs = 10
  config.finetune_epochs = 3
  config.finetune_lr = 0.01  # SGD (the base's optimizer), cosine decay.
  config.finetune_warmup_epochs = 0.0  # not the base's warm-up
  config.max_train_examples = -1  # -1: the whole training split.
  # Rows of the table: none, l1 (exact), l1_fd (finite difference at the
  # same λ), l2, dq, ste; and any name of extra_methods.
  config.methods = ("none", "l1", "l1_fd", "l2", "dq", "ste")
  # λ grids for the paper's rule (fine-tunes of the first seed): the largest
  # λ whose float minival accuracy is within selection_tolerance points of
  # the unregularized fine-tune's.
  config.lambda_grid = (0.005, 0.01, 0.02, 0.05, 0.1)
  config.l2_lambda_grid = (0.5, 1.0, 2.0, 5.0)
  config.selection_tolerance = 0.5
  # Seeds that fine-tune every λ (the first n of seeds); the rule compares
  # their mean minival accuracy. 1: the paper's single model per λ.
  config.selection_seeds = 1
  config.dq_beta = 0.01  # Defensive Quantization's β.
  config.ste_bits = "4:4"  # STE fine-tuning target (W:A).
  # More rows: name -> "field=value;field=value" applied to the fine-tune
  # config; "@l1" is the chosen ℓ1 λ, "@l1*4" four times it.
  config.extra_methods = ml_collections.ConfigDict()
  # The PTQ sweep (W:A pairs) on the test split.
  config.bits = "8:8,8:4,6:4,4:4,4:3,3:3,8:2,4:2"
  config.eval_batch_size = 1000  # -1: the trainer's batch size.
  config.max_test_examples = -1  # -1: the whole test split.
  # Batches of the FD-vs-exact cosine check per base (0: skip).
  config.fd_cosine_batches = 16
  return config
