r"""The paper's Table 2 as one study: ImageNet (ILSVRC2012), ResNet-18.

Full-size ResNet-18 (configs/imagenet_r18.py, 11.69 M parameters). The
protocol of the paper (Alizadeh et al., ICLR 2020, §4.1, §4.3):

* Base: the config as is (SGD-Nesterov, global batch 256, lr 0.1, cosine
  over 90 epochs, weight decay 1e-4), unregularized and without its 5
  warm-up epochs (see below); 10,000 training images held out (tfds: a
  seeded uniform subset, not stratified) as ``minival``. One seed by
  default: the paper reports one run per row, and each further seed adds
  about 2.2 days of GPU time (below); ``--config.seeds=0,1,2`` for three.
* Every method then fine-tunes the base for 15 epochs, the paper's length of
  the regularized phase ("the last 15 epochs of training or an additional
  fine-tuning phase"; configs/imagenet_r18.py's ``reg.last_epochs`` is 15
  too): none, ℓ1 exact, ℓ1 finite difference, ℓ2, DQ, STE at (4,4), and
  ``l1_large``, the paper's larger-λ row: ℓ1 at 4 × the chosen λ (the paper
  shows a λ past its rule that gives up float accuracy for 4-bit accuracy;
  the grid's steps are ×2–2.5, so ×4 lies two steps beyond the chosen λ).
  ``--config.finetune_epochs=5`` divides the fine-tuning time by 3.
* λ (ℓ1) by the paper's rule on minival, from a grid around λ = 0.05 (the
  value of configs/imagenet_r18.py); ℓ2's λ likewise (the paper gives
  none; see study.md's penalty / cross-entropy column and extend a grid
  whose end point the rule picks). DQ's β is the study's default (0.01).
* PTQ of every fine-tuned model at FP, (8,8), (6,6), (4,4) (the paper's
  ImageNet pairs: weights and activations at the same bit-width) on the
  50,000 validation images (the ``test`` split of ImageNet here).

Learning rates. Fine-tuning: the base's cosine where the paper's other
variant, regularizing the last 15 epochs, would switch the penalty on (epoch
75 of 90): 0.1 · (1 + cos(π·75/90)) / 2 = 0.1 × 0.067 = 6.7e-3; then a
cosine to 0 over the 15 epochs, as the base's schedule falls over its last
15. Warm-up: the study's fine-tunes share ``config.train`` with the base,
so a warm-up there would also spend the first 5 of the 15 fine-tuning epochs
ramping up; the base goes without it, as the standard batch-256 ResNet
recipe does.

Prepare the data once: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
into ~/tensorflow_datasets/downloads/manual/, then
  pip install tensorflow importlib_resources
  tfds build imagenet2012 --file_format=array_record
Command (rerunning resumes):
  python study.py --config configs/studies/imagenet_table2.py \
    --workdir studies/imagenet_table2

Expected time on one modern GPU: an ESTIMATE, not measured (no GPU was
available); about 3.5 days for one seed (8 days for three). The arithmetic:

* Flops of one training step, XLA's count of the compiled step
  (benchmarks/results/imagenet.json, batch 8, 224×224): plain 7.98e10, i.e.
  9.97 GFLOP per image; relative to plain (same file; also
  benchmarks/RESULTS.md): ℓ1 exact 2.94×, ℓ2 2.94×, ℓ1 finite difference
  2.00×, DQ 1.39×, STE 1.02×.
* Assumption: 20 TFLOP/s sustained on these float32 steps (A100/H100
  class). For scale, the paper's RTX 2080 Ti plain epoch (33 min 20 s,
  1,281,167 images) works out at 6.4 TFLOP/s of the same count.
* A plain epoch (1,271,167 images): 1,271,167 × 9.97e9 / 20e12 = 634 s.
* Plain-epoch equivalents, one seed: base 90; λ grids, 2 extra ℓ1 and 2
  extra ℓ2 fine-tunes (the chosen λ's run is the seed's own) 4 × 15 × 2.94
  = 176; methods 15 × (1 + 2.94 + 2.00 + 2.94 + 1.39 + 1.02 + 2.94) = 213;
  total 480 → 480 × 634 s = 84 h. Each further seed: 90 + 213 = 303 →
  53 h; three seeds: 270 + 176 + 640 = 1,087 → 191 h. Minival
  evaluations (10,000 images every 5 epochs) and the PTQ sweeps (7 runs × 4
  passes over 50,000 images, a forward pass ≈ 1/3 of a training step) add
  under 1 %.
* What could make it longer: input. A plain step at 20 TFLOP/s consumes
  ~2,000 images/s of JPEG decoding and random-resized crops, more than 8
  grain workers (the config's) may deliver (benchmarks/RESULTS.md measured
  ~1,000 images/s on 2 cores on small mock images, an upper bound); raise
  ``--config.train.worker_count`` with the host's cores. And the regularized
  steps' time ratio (2.55× plain on CPU, benchmarks/RESULTS.md; the
  paper's PyTorch GPU epochs 8.6×): at 5× instead of 3×, the total grows by
  about 1/2. ``--config.train.compute_dtype=bfloat16`` is faster on GPUs
  with bfloat16 units.

The paper's numbers to compare against (Table 2, top-1 % on the ImageNet
validation set, (W,A) = (weight, activation) bits; each STE row was
fine-tuned at its own pair, this study's ``ste`` row is STE @ (4,4); the
paper's "No Regularization" is its base, this study's ``none`` the base
fine-tuned without regularization; "larger λ" is the paper's row
"L1 Regularization (Ours)" with its larger λ, this study's ``l1_large``):

                                        FP     (8,8)  (6,6)  (4,4)
  No Regularization                     69.70  69.20  63.80   0.30
  DQ Regularization                     68.28  67.76  62.31   0.24
  L2 Regularization                     68.34  68.02  64.52   0.19
  L1 Regularization (Ours)              70.07  69.92  66.39   0.22
  L1 Regularization (Ours), larger λ    64.02  63.76  61.19  55.32
  STE @ (8,8)                           –      70.06  60.18   0.13
  STE @ (6,6)                           –      –      69.63  11.34
  STE @ (4,4)                           –      –      –      57.50
"""

from configs import imagenet_r18
from configs.studies import base
from configs.studies import cifar10_table1

FINETUNE_EPOCHS = 15
# The larger-λ row: ℓ1 at this multiple of the λ chosen by the rule.
LARGE_LAMBDA_FACTOR = 4


def get_config():
  """The Table 2 study."""
  train = imagenet_r18.get_config()
  # The base is trained unregularized; every fine-tune sets its own method.
  train.reg.kind = "none"
  train.reg.weight_coef = 0.0
  train.reg.last_epochs = -1
  # Fine-tunes share the base's trainer config: no warm-up in either.
  train.warmup_epochs = 0.0
  config = base.get_config(train)
  config.name = "imagenet_table2"
  config.train.minival_examples = 10000
  config.seeds = (0,)
  config.base_epochs = train.num_epochs  # 90
  config.finetune_epochs = FINETUNE_EPOCHS
  config.finetune_lr = cifar10_table1.late_learning_rate(
    train.learning_rate, config.base_epochs, FINETUNE_EPOCHS
  )
  config.extra_methods.l1_large = (
    f"reg.kind=l1;reg.weight_coef=@l1*{LARGE_LAMBDA_FACTOR}"
  )
  config.methods = ("none", "l1", "l1_fd", "l2", "dq", "ste", "l1_large")
  config.lambda_grid = (0.02, 0.05, 0.1)
  config.l2_lambda_grid = (5.0, 20.0, 80.0)
  config.ste_bits = "4:4"
  config.bits = "8:8,6:6,4:4"
  # 50,000 validation images in batches of 500: 100 batches, no padding.
  config.eval_batch_size = 500
  return config
