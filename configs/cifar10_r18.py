"""ResNet-18 (CIFAR stem) on CIFAR-10, ℓ1 gradient penalty in the last 15 epochs.

Same recipe as configs/cifar10_vgg.py with the CIFAR ResNet-18 (3×3 stem, no
max-pool; 11.2 M parameters).

Command:
  python train.py --config configs/cifar10_r18.py --workdir runs/cifar10_r18_l1
Run time: not measured here (no GPU); the paper's PyTorch run took 24 s per
plain epoch and 209 s per regularized epoch on an RTX 2080 Ti.
Expected accuracy (the paper's, not reproduced here): 93.4 % float; with
activations at 4 bits 88.7 / 88.5 / 87.6 % at 8 / 6 / 4-bit weights, against
85.5 / 85.4 / 84.0 % without regularization.
"""

from configs import cifar10_vgg


def get_config():
  config = cifar10_vgg.get_config()
  config.model = "resnet18_cifar"
  del config.model_kwargs["width_multiplier"]
  config.model_kwargs.num_filters = 64
  config.learning_rate = 0.1
  return config
