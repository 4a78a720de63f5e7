"""A narrow VGG-like net on Fashion-MNIST, with a held-out minival split.

The data: Debian/Ubuntu's package (as root: apt-get install
dataset-fashion-mnist), or the four IDX files in --config.data_dir, or a tfds
ArrayRecord build (l1grad/data.py says where it looks). 5,000 training images
(500 per class) are held out as "minival" and the periodic evaluation reads
them, so choices made on the logged accuracy never see the test split; the
model trains on the other 55,000.

Command:
  python train.py --config configs/fashion_mnist.py --workdir runs/fashion_mnist
The VGG-like stack (3 max-pools) takes 28×28 inputs to 14, 7 and 3 pixels.
Run time: one epoch (429 steps of 128) took 3 min 44 s wall on 2 CPU cores
shared with another job (load average 4.1 to 4.5; 250 to 450 img/s), so the
4 epochs should take about 15 min there; the full 4-epoch run was not timed.
Expected result: after that one epoch (--config.num_epochs=1), 90.16 %
minival and 89.57 % test accuracy (float; test from eval_ptq.py, which also
gave 89.61 % at W8:A8 and 87.74 % at W4:A4). The 4-epoch accuracy was not
measured.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = "fashion_mnist"
  config.model = "vgg_like"
  config.model_kwargs.width_multiplier = 0.125
  config.batch_size = 128
  config.learning_rate = 0.05
  config.num_epochs = 4
  config.eval_every_epochs = 1
  config.log_every_steps = 100
  config.minival_examples = 5000
  config.eval_split = "minival"
  return config
