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
  # λ grids of extra methods that choose their own λ by the same rule: the
  # method's fields say where it goes with "@lambda" (e.g.
  # "reg.kind=l1;reg.weighting=bin_width;reg.target_bits=4:4;
  # reg.weight_coef=@lambda"), and this maps its name to the grid.
  config.extra_lambda_grids = ml_collections.ConfigDict()
  # study.md's paired tables: every method minus each of these, seed by
  # seed (e.g. ("none", "l1") also compares the ℓ1 variants with exact ℓ1).
  config.paired_references = ("none",)
  # The PTQ sweep (W:A pairs) on the test split.
  config.bits = "8:8,8:4,6:4,4:4,4:3,3:3,8:2,4:2"
  config.eval_batch_size = 1000  # -1: the trainer's batch size.
  config.max_test_examples = -1  # -1: the whole test split.
  # Batches of the FD-vs-exact cosine check per base (0: skip).
  config.fd_cosine_batches = 16
  return config


def add_variants(
  config: ml_collections.ConfigDict,
  *,
  bound_lambda_grid: tuple[float, ...],
  lazy_lambda_grid: tuple[float, ...] = (),
  bound_bits: str = "4:4",
) -> None:
  """Adds the rows of the bound-weighted and the cheaper ℓ1 penalties.

  * ``l1_bound44``: the paper's first-order bound at ``bound_bits``,
    λ·Σₜ (Δₜ/2)·‖∇ₜL‖₁ with each tensor's own bin width
    (``reg.weighting=bin_width``), its λ chosen by the rule over
    ``bound_lambda_grid`` (Δ/2 ≪ 1, so it is larger than the single λ).
  * ``l1_lazy4``, ``l1_lazy16`` (with a ``lazy_lambda_grid``): lazy
    regularization, the penalty on every k-th step at k × λ; λ is the mean
    coefficient per step, chosen by the rule on its own grid.
  * ``l1_cd`` and ``l1_fd_short``: finite-difference step rules at the
    exact penalty's λ: two-sided (3 gradients), and a 10× shorter probe
    (fewer ReLU units cross their kink).
  """
  l1 = "reg.kind=l1;reg.act_coef=-1;"
  name = "l1_bound" + bound_bits.replace(":", "")
  config.extra_methods[name] = (
    f"{l1}reg.weight_coef=@lambda;reg.weighting=bin_width;"
    f"reg.target_bits={bound_bits}"
  )
  config.extra_lambda_grids[name] = bound_lambda_grid
  methods = []
  for k in (4, 16) if lazy_lambda_grid else ():
    lazy = f"l1_lazy{k}"
    config.extra_methods[lazy] = (
      f"{l1}reg.weight_coef=@lambda;reg.every_steps={k}"
    )
    config.extra_lambda_grids[lazy] = lazy_lambda_grid
    methods.append(lazy)
  methods.append(name)
  config.extra_methods.l1_cd = (
    f"{l1}reg.weight_coef=@l1;reg.method=central_difference"
  )
  config.extra_methods.l1_fd_short = (
    f"{l1}reg.weight_coef=@l1;reg.method=finite_difference;reg.fd_step=0.0001"
  )
  config.methods = (*config.methods, *methods, "l1_cd", "l1_fd_short")
  config.paired_references = ("none", "l1")
