"""Base config: every field the trainer reads, with its meaning.

Not meant to be run on its own; the dataset configs import it and patch a
few fields. Any field can be overridden on the command line, e.g.
``--config.reg.kind=l1 --config.reg.weight_coef=0.05``. A value of -1 means
"derive it" (see the field's comment).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data: "digits" (embedded, scikit-learn), "fashion_mnist" (IDX files or
  # tfds), "cifar10", "imagenet2012" (tfds).
  config.dataset = "digits"
  # tfds data dir; "" = tfds default ($TFDS_DATA_DIR). Fashion-MNIST also
  # reads its four IDX files from here, else from a tfds build, else from
  # Debian's /usr/share/datasets/fashion-mnist ($L1GRAD_FASHION_MNIST_DIR).
  config.data_dir = ""
  config.worker_count = 0  # grain worker processes for the training input.
  # Hold out this many examples of the official training split as the
  # "minival" split, for model selection (training never sees them); 0: none.
  # Fixed whatever the seed; stratified by label for digits and Fashion-MNIST
  # IDX files, a seeded uniform subset for tfds datasets.
  config.minival_examples = 0
  # Train on a fixed (stratified where possible) subset of this many of the
  # remaining training examples, for quick runs; -1: all.
  config.max_train_examples = -1

  # Model: a name from l1grad.models.MODEL_NAMES; model_kwargs are its fields.
  config.model = "digits_cnn"
  config.model_kwargs = ml_collections.ConfigDict()
  config.compute_dtype = "float32"  # or "bfloat16" (accelerators).

  # Optimisation. batch_size is global (all devices and hosts together).
  config.num_epochs = 30
  config.batch_size = 64
  config.eval_batch_size = -1  # -1: same as batch_size.
  config.optimizer = "sgd"  # "sgd" (momentum, as the paper) or "adamw".
  config.learning_rate = 0.05  # peak learning rate.
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 5e-4  # on Conv/Dense kernels only.
  config.schedule = "cosine"  # "cosine", "step" or "constant".
  config.warmup_epochs = 0.0
  config.step_epochs = ()  # "step" schedule: epochs where the lr is cut.
  config.step_factor = 0.1

  # Regularization (paper eq. 3 and the baselines).
  config.reg = ml_collections.ConfigDict()
  config.reg.kind = "none"  # "none", "l1", "l2" or "dq".
  # λ_w; for "dq" the orthogonality strength β.
  config.reg.weight_coef = 0.0
  config.reg.act_coef = (
    -1.0
  )  # λ_a; -1: same as weight_coef (the paper's one λ).
  # "hvp" (exact), "reverse" (exact, slow), "finite_difference" or
  # "central_difference" (approximations, l1grad/penalty.py).
  config.reg.method = "hvp"
  config.reg.fd_step = 1e-3  # relative probe distance of the differences.
  # How "hvp" runs: "linearize" (fastest; 2–2.6× a plain step's memory),
  # "two_pass" (the same step up to rounding, ≤ 2× the memory, slower).
  config.reg.hvp_impl = "linearize"
  # Where the activation term reads A: "layer_inputs" (the Conv/Dense inputs,
  # where those layers read them) or "tensors" (each such tensor perturbed
  # once for every reader, a ResNet identity shortcut's add included).
  config.reg.points = "layer_inputs"
  # ord 2 only: "batch_mean" uses sqrt(B)·‖∇_A L‖₂, which does not change when
  # the batch is duplicated; "none" (the paper's) shrinks as 1/sqrt(k).
  config.reg.act_norm = "none"
  # Regularize only the last N epochs (the paper: 15); -1: every epoch.
  config.reg.last_epochs = -1
  # l1 only: "bin_width" weights each tensor's term by its bin width at
  # reg.target_bits ("W:A"), so the penalty is λ·Σ (Δ/2)·|∇L|, the paper's
  # first-order bound on the loss change of quantizing at those bits
  # (docs/method.md §1.1): λ_w·Δ/2 per kernel, λ_a·Δ/2 per activation, Δ from
  # the current folded params and DFQ ranges at every step (held fixed in
  # the derivative). "none": one λ for every tensor (the paper's).
  config.reg.weighting = "none"
  config.reg.target_bits = ""  # "W:A" for "bin_width", e.g. "4:4".
  # Lazy regularization (StyleGAN2's lazy R1): k > 1 runs the penalty only
  # on every k-th step of the regularized phase (counted from its first step)
  # with its coefficients multiplied by k there, the plain step in between:
  # the same penalty per step on average, at about 1 + (r − 1)/k times a plain
  # step's cost for a penalty costing r×. weight_coef and act_coef stay the
  # per-step λ (tune λ as for k = 1; the trainer does the × k). Logs: every
  # row's `penalty` (and its terms) is the most recent penalty step's value
  # divided by k, i.e. on a k = 1 run's scale; `regularized` says whether the
  # row's own step ran it; the gradient norms are logged on every step.
  # Applies to l1, l2 and dq; 1: every step.
  config.reg.every_steps = 1

  # Fine-tuning: workdir of another run; its latest params and batch stats
  # are the start (optimizer and step start afresh).
  config.init_from = ""

  # STE quantization-aware training at a fixed "W:A" (e.g. "4:4"); "" = off.
  config.qat = ml_collections.ConfigDict()
  config.qat.bits = ""
  # What STE training simulates (l1grad/qat.py, docs/method.md §4):
  # "folded": what PTQ evaluates: kernels quantized with batch norm folded in
  #   (running statistics), activations on the BN-derived (DFQ) ranges of the
  #   current parameters; "unfolded": the unfolded kernels quantized, BN in
  #   float, activations on each batch's min/max (the earlier scheme).
  config.qat.scheme = "folded"
  # "folded": the fraction of the steps, at the end, that run with batch norm
  # frozen at its running statistics (the forward pass is then exactly the
  # PTQ one); before, BN normalizes with the batch statistics of the quantized
  # conv. -1: all steps when fine-tuning (init_from: the statistics are
  # already those of a trained model; best on digits), else the last 0.2.
  config.qat.freeze_bn_fraction = -1.0

  # Logging, evaluation and checkpoints.
  config.log_every_steps = 50
  config.eval_every_epochs = 1  # -1: only at the end.
  config.checkpoint_every_steps = -1  # -1: once per epoch.
  config.keep_checkpoints = 3
  # The split the periodic evaluation reads: "test" or "minival" (needs
  # minival_examples). Its metrics keep the names test_accuracy/test_loss;
  # the row's eval_on_minival (1 or 0) says which split they come from.
  config.eval_split = "test"
  config.max_eval_examples = -1  # -1: the whole evaluation split.
  # Testing hook: stop after this many steps (-1: the full schedule).
  config.max_steps = -1
  return config
