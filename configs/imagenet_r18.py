"""ResNet-18 on ImageNet (ILSVRC2012), ℓ1 gradient penalty as a fine-tune.

The paper regularizes ImageNet ResNet-18 in the last 15 epochs / as a
fine-tuning phase. Standard recipe otherwise (not given by the paper): SGD
with Nesterov momentum 0.9, global batch 256, learning rate 0.1 with 5
warm-up epochs then cosine over 90 epochs, weight decay 1e-4 (the paper fixes
weight decay for all runs), bfloat16 compute is an option on accelerators
(--config.compute_dtype=bfloat16).

Prepare the data once: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
into ~/tensorflow_datasets/downloads/manual/, then
  pip install tensorflow importlib_resources
  tfds build imagenet2012 --file_format=array_record
Command:
  python train.py --config configs/imagenet_r18.py --workdir runs/imagenet_r18_l1
Run time: not measured here (no GPU); the paper's PyTorch run took 33 min per
plain epoch and 4 h 45 per regularized epoch on one RTX 2080 Ti.
Expected accuracy (the paper's, not reproduced here): 70.1 % float, 69.9 / 66.4
% at (8,8) / (6,6) bits, against 69.7 / 69.2 / 63.8 % without regularization.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = "imagenet2012"
  config.model = "resnet18_imagenet"
  config.model_kwargs.num_filters = 64
  config.num_epochs = 90
  config.batch_size = 256
  config.learning_rate = 0.1
  config.warmup_epochs = 5.0
  config.weight_decay = 1e-4
  config.schedule = "cosine"
  config.reg.kind = "l1"
  config.reg.weight_coef = 0.05
  config.reg.last_epochs = 15
  config.log_every_steps = 500
  config.eval_every_epochs = 5
  config.worker_count = 8
  return config
