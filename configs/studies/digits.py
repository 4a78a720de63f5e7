"""The embedded study: the paper's protocol on scikit-learn's digits.

What ``scripts/demo.sh`` runs. Bases of the digits CNN (width 32) for 3
seeds, λ chosen on 360 held-out training images by the paper's rule, every
method fine-tuned for 10 epochs (SGD, lr 0.01, cosine), PTQ on the 360 test
digits. The extra row ``ste_unfolded`` is STE with the earlier, unfolded
scheme (batch norm in float, batch min/max ranges), for comparison; the
rows of ``base.add_variants``: the bound-weighted penalty at (4,4) and two
finite-difference step rules.

Command:
  python study.py --config configs/studies/digits.py --workdir studies/digits
Run time: 14 min 44 s from scratch on an otherwise idle 2-core machine
(README.md, "What the demo does and shows"); compilation dominates.
Expected result: the README's digits table (ℓ1 costs a little float
accuracy and gains most at (3,3) and the 2-bit pairs; the bound-weighted
penalty gains as much at no float cost).
"""

from configs import digits
from configs.studies import base


def get_config():
  train = digits.get_config()
  train.model_kwargs.width = 32
  config = base.get_config(train)
  config.name = "digits"
  config.train.minival_examples = 360
  config.base_epochs = 15
  config.finetune_epochs = 10
  # The rule on one seed picked λ = 0.05, the last grid value before the
  # cliff (0.1: 69 % minival), and seed 2 fell over it (float 85.6 % test,
  # README); every seed's minival decides instead (cheap here).
  config.selection_seeds = 3
  config.lambda_grid = (0.005, 0.01, 0.02, 0.05, 0.1)
  config.l2_lambda_grid = (1.0, 2.0, 5.0, 10.0, 20.0)
  config.extra_methods.ste_unfolded = "qat.bits=4:4;qat.scheme=unfolded"
  config.methods = (*config.methods, "ste_unfolded")
  # The bound's Δ/2 is ≈ 0.01–0.08 for the kernels and ≈ 0.21 for the
  # activations here, so its λ is ~10× the single λ at the same strength.
  base.add_variants(config, bound_lambda_grid=(0.05, 0.1, 0.2, 0.5, 1.0, 2.0))
  config.bits = "8:8,6:4,4:4,4:3,3:8,3:3,8:2,4:2,3:2"
  config.eval_batch_size = 360
  return config
