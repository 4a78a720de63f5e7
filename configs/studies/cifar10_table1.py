r"""The paper's Table 1 as one study: CIFAR-10, VGG-like or ResNet-18.

``get_config(arch)`` with ``arch`` "vgg" (default; configs/cifar10_vgg.py,
12.98 M parameters) or "resnet18" (configs/cifar10_r18.py, 11.17 M), full
size. The protocol of the paper (Alizadeh et al., ICLR 2020, §4.1, §4.3):

* Bases: the architecture's config as is (SGD-Nesterov, batch 128, cosine
  over 200 epochs, weight decay 5e-4), unregularized, for 3 seeds; 5,000
  training images held out (tfds: a seeded uniform subset) as ``minival``.
* Every method then fine-tunes each base for 15 epochs (the paper "only
  enable[s] regularization in the last 15 epochs of training or as an
  additional fine-tuning phase"; this is the fine-tuning phase): none, ℓ1
  exact, ℓ1 finite difference, ℓ2, DQ, STE at (4,4).
* λ (ℓ1) by the paper's rule on minival, from a grid around the paper's
  λ = 0.05; ℓ2's λ likewise (the paper gives none; the unsquared ℓ2 norm of
  a gradient is smaller than its ℓ1 norm, so its λ is larger: check the
  grid's penalty / cross-entropy column in study.md and extend the grid if
  the rule picks an end point). DQ's β is the study's default (0.01); the
  paper searched β over Defensive Quantization's values.
* PTQ of every fine-tuned model at FP, (8,4), (6,4), (4,4) (the paper's
  CIFAR pairs: activations at 4 bits) on the 10,000 test images.

Fine-tuning learning rate: the base's cosine schedule where the paper's
other variant, regularizing the last 15 epochs, would switch the penalty on
(epoch 185 of 200), rounded to 2 digits: lr₀·(1 + cos(π·185/200))/2 = 0.05
× 0.0138 ≈ 6.9e-4 (VGG-like), 0.1 × 0.0138 ≈ 1.4e-3 (ResNet-18); then a
cosine to 0 over the 15 epochs, as the base's schedule falls over its last
15. The fine-tunes thus see the learning rates of that variant, from the
converged base; a larger rate would first move the converged base away from
its minimum. Every method shares it (the paper searched STE's per pair).

Prepare the data once (needs TensorFlow for the build step only):
  pip install tensorflow importlib_resources
  tfds build cifar10 --file_format=array_record
Command (rerunning resumes):
  python study.py --config configs/studies/cifar10_table1.py \
    --workdir studies/cifar10_table1_vgg
  python study.py --config configs/studies/cifar10_table1.py:resnet18 \
    --workdir studies/cifar10_table1_resnet18

Expected time on one modern GPU: an ESTIMATE, not measured (no GPU was
available); about 3 h (VGG-like) and 2.5 h (ResNet-18). The arithmetic:

* Flops of one training step at batch 128, XLA's count of the compiled step
  (benchmarks/results/cifar_fullsize_memory.json): plain 4.27e11 (VGG-like)
  and 3.72e11 (ResNet-18), i.e. 3.34 and 2.91 GFLOP per image; relative to
  plain (same file; also benchmarks/RESULTS.md): ℓ1 exact 2.99×, ℓ2 2.99×,
  ℓ1 finite difference 2.00×, DQ 1.15× / 1.08×, STE 1.01× / 1.02×.
* Assumption: 20 TFLOP/s sustained on these float32 steps (A100/H100
  class). For scale, the paper's RTX 2080 Ti plain epochs (14 s VGG-like,
  24 s ResNet-18, 50,000 images) work out at 11.9 and 6.1 TFLOP/s of the
  same counts.
* A plain epoch (45,000 images): 45,000 × 3.34e9 / 20e12 = 7.5 s (VGG-like),
  6.5 s (ResNet-18).
* Plain-epoch equivalents: bases 3 × 200 = 600; λ grids, 3 extra ℓ1 and 3
  extra ℓ2 fine-tunes (the chosen λ's run is seed 0's own) 6 × 15 × 2.99 =
  269; methods 3 seeds × 15 × (1 + 2.99 + 2.00 + 2.99 + 1.15 + 1.01) = 501
  (499 for ResNet-18); total 1,371 → 1,371 × 7.5 s = 2.9 h (VGG-like),
  1,368 × 6.5 s = 2.5 h (ResNet-18). Minival evaluations (5,000 images
  every 5 epochs), the PTQ sweeps (18 runs × 4 passes over 10,000 images,
  a forward pass ≈ 1/3 of a training step) and the FD check add under 2 %.
* What could make it longer: the per-step overhead on these small 32×32
  batches, and the regularized steps' time ratio (2.4× plain on CPU,
  benchmarks/RESULTS.md; the paper's PyTorch GPU epochs were 5.6× and 8.7×):
  at 5× instead of 3×, the ℓ1/ℓ2 runs grow by 2/3, the total by about 1/3.
  The bases alone are 1.3 h (VGG-like) and 1.1 h (ResNet-18).

The paper's numbers to compare against (Table 1, top-1 % on the CIFAR-10
test set, (W,A) = (weight, activation) bits; each STE row was fine-tuned at
its own pair, this study's ``ste`` row is STE @ (4,4); the paper's "No
Regularization" is its base, this study's ``none`` the base fine-tuned
without regularization):

  VGG-like                   FP     (8,4)  (6,4)  (4,4)
  No Regularization          92.49  79.10  78.84  11.47
  DQ Regularization          91.51  86.30  84.29  30.86
  L2 Regularization          91.88  86.64  86.14  63.93
  L1 Regularization (Ours)   92.63  89.74  89.78  85.99
  STE @ (8,4)                –      91.28  89.99  32.83
  STE @ (6,4)                –      –      90.25  39.56
  STE @ (4,4)                –      –      –      89.79

  ResNet-18                  FP     (8,4)  (6,4)  (4,4)
  No Regularization          93.54  85.51  85.35  83.98
  DQ Regularization          92.46  83.31  83.34  82.47
  L2 Regularization          93.31  84.50  84.99  83.82
  L1 Regularization (Ours)   93.36  88.70  88.45  87.62
  STE @ (8,4)                –      89.10  87.79  86.21
  STE @ (6,4)                –      –      90.77  88.17
  STE @ (4,4)                –      –      –      89.98
"""

import math

from configs import cifar10_r18
from configs import cifar10_vgg
from configs.studies import base
from l1grad import errors

ARCHS = {"vgg": cifar10_vgg, "resnet18": cifar10_r18}
# Where the paper's regularized phase starts: the last 15 of the base's
# epochs.
FINETUNE_EPOCHS = 15


def late_learning_rate(peak: float, epochs: int, last_epochs: int) -> float:
  """The base's cosine learning rate ``last_epochs`` before its end.

  Rounded to 2 significant digits.

  Args:
    peak: The base's peak learning rate.
    epochs: The base's epochs (cosine over all of them, no warm-up).
    last_epochs: How many epochs before the end.

  Returns:
    ``peak · (1 + cos(π·(epochs − last_epochs)/epochs)) / 2``.
  """
  t = (epochs - last_epochs) / epochs
  return float(f"{peak * 0.5 * (1.0 + math.cos(math.pi * t)):.2g}")


def get_config(arch: str = "vgg"):
  """The Table 1 study of ``arch`` ("vgg" or "resnet18")."""
  if arch not in ARCHS:
    raise errors.ConfigError(
      f"configs/studies/cifar10_table1.py: unknown architecture {arch!r};"
      f" use one of {', '.join(ARCHS)}, e.g. --config"
      " configs/studies/cifar10_table1.py:resnet18."
    )
  train = ARCHS[arch].get_config()
  # The bases are trained unregularized; every fine-tune sets its own method.
  train.reg.kind = "none"
  train.reg.weight_coef = 0.0
  train.reg.last_epochs = -1
  config = base.get_config(train)
  config.name = f"cifar10_table1_{arch}"
  config.train.minival_examples = 5000
  config.seeds = (0, 1, 2)
  config.base_epochs = train.num_epochs  # 200
  config.finetune_epochs = FINETUNE_EPOCHS
  config.finetune_lr = late_learning_rate(
    train.learning_rate, config.base_epochs, FINETUNE_EPOCHS
  )
  config.methods = ("none", "l1", "l1_fd", "l2", "dq", "ste")
  config.lambda_grid = (0.01, 0.02, 0.05, 0.1)
  config.l2_lambda_grid = (2.0, 5.0, 20.0, 50.0)
  config.ste_bits = "4:4"
  config.bits = "8:4,6:4,4:4"
  config.eval_batch_size = 1000
  return config
