"""The paper's Table 1 and 2 as studies (configs/studies/*_table[12].py).

The configs are checked against what their docstrings promise, and each
(both CIFAR-10 architectures and ImageNet) runs as a reduced study in this
process on ``tfds.testing.mock_data`` (random examples, no download): a tiny
model of the same family (VGG-like; ResNet with the config's stem), one
seed, one epoch per run, one-point λ grids, a few examples. Every method row
and every bit pair must reach ``study.json``.
"""

import json
import math
import os

from absl import flags
from ml_collections import config_flags
import pytest
import tensorflow_datasets as tfds

from configs.studies import cifar10_table1
from configs.studies import imagenet_table2
from l1grad import errors
from l1grad import study

CIFAR_METHODS = ("none", "l1", "l1_fd", "l2", "dq", "ste")
IMAGENET_METHODS = (*CIFAR_METHODS, "l1_large")


def _pairs(bits: str) -> set[tuple[int | None, int | None]]:
  out = {(None, None)}  # FP
  for pair in bits.split(","):
    w, a = pair.split(":")
    out.add((int(w), int(a)))
  return out


# ------------------------------------------------------------- the configs


@pytest.mark.parametrize("arch", ["vgg", "resnet18"])
def test_cifar10_table1_config_is_the_papers_protocol(arch):
  config = cifar10_table1.get_config(arch)
  study.validate(config)
  assert config.name == f"cifar10_table1_{arch}"
  assert config.train.dataset == "cifar10"
  assert (
    config.train.model
    == {"vgg": "vgg_like", "resnet18": "resnet18_cifar"}[arch]
  )
  # Full size.
  if arch == "vgg":
    assert config.train.model_kwargs.width_multiplier == 1.0
  else:
    assert config.train.model_kwargs.num_filters == 64
  # Unregularized bases.
  assert config.train.reg.kind == "none"
  assert config.train.reg.weight_coef == 0.0
  assert config.train.reg.last_epochs == -1
  assert config.seeds == (0, 1, 2)
  assert config.base_epochs == 200 and config.finetune_epochs == 15
  assert config.train.minival_examples == 5000
  assert config.methods == CIFAR_METHODS
  assert config.ste_bits == "4:4"
  assert config.bits == "8:4,6:4,4:4"
  assert 0.05 in config.lambda_grid
  # The base's cosine at epoch 185 of 200 (6.9e-4 / 1.4e-3).
  peak = {"vgg": 0.05, "resnet18": 0.1}[arch]
  assert config.train.learning_rate == peak
  expected = peak * 0.5 * (1 + math.cos(math.pi * 185 / 200))
  assert config.finetune_lr == pytest.approx(expected, rel=0.02)
  assert config.finetune_lr == {"vgg": 6.9e-4, "resnet18": 1.4e-3}[arch]


def test_imagenet_table2_config_is_the_papers_protocol():
  config = imagenet_table2.get_config()
  study.validate(config)
  assert config.name == "imagenet_table2"
  assert config.train.dataset == "imagenet2012"
  assert config.train.model == "resnet18_imagenet"
  assert config.train.model_kwargs.num_filters == 64
  assert config.train.reg.kind == "none"
  assert config.train.reg.weight_coef == 0.0
  assert config.train.reg.last_epochs == -1
  assert config.train.warmup_epochs == 0.0
  assert config.seeds == (0,)
  assert config.base_epochs == 90 and config.finetune_epochs == 15
  assert config.train.minival_examples == 10000
  assert config.methods == IMAGENET_METHODS
  assert config.ste_bits == "4:4"
  assert config.bits == "8:8,6:6,4:4"
  assert 0.05 in config.lambda_grid
  assert config.finetune_lr == 6.7e-3  # the base's cosine at epoch 75 of 90
  assert 50000 % config.eval_batch_size == 0
  # The larger-λ row is ℓ1 at 4 × the chosen λ.
  jobs = study.plan_finetunes(config, "/w", {"l1": 0.05, "l2": 20.0})
  (large,) = [j for j in jobs if j.method == "l1_large"]
  assert large.config.reg.kind == "l1"
  assert large.config.reg.weight_coef == pytest.approx(0.2)
  assert large.config.reg.act_coef == -1.0  # the paper's one λ


def test_cifar10_table1_arch_is_the_config_file_parameter():
  # As study.py's --config flag reads it (a parameter after ':').
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values)
  path = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "configs",
    "studies",
    "cifar10_table1.py",
  )
  flag_values(["prog", f"--config={path}:resnet18"])
  assert flag_values.config.train.model == "resnet18_cifar"
  flag_values(["prog", f"--config={path}"])
  assert flag_values.config.train.model == "vgg_like"
  with pytest.raises(errors.ConfigError, match="vgg, resnet18"):
    cifar10_table1.get_config("resnet50")


# ------------------------------------------------------ reduced studies


def _tiny(config, batch: int, minival: int, train: int, test: int) -> None:
  config.update_from_flattened_dict(
    {
      "seeds": (0,),
      "base_epochs": 1,
      "finetune_epochs": 1,
      "max_train_examples": train,
      "train.minival_examples": minival,
      "train.batch_size": batch,
      "train.worker_count": 0,
      "train.log_every_steps": 1,
      "train.eval_every_epochs": -1,
      "lambda_grid": (0.05,),
      "l2_lambda_grid": (5.0,),
      "eval_batch_size": batch,
      "max_test_examples": test,
      "fd_cosine_batches": 1,
    }
  )


def _run_and_check(config, workdir: str, methods) -> None:
  study.validate(config)
  study.run_study(config, workdir, say=lambda _: None)
  with open(os.path.join(workdir, "study.json")) as f:
    out = json.load(f)
  assert out["methods"] == list(methods)
  pairs = _pairs(config.bits)
  rows = {(r["method"], r["w_bits"], r["a_bits"]) for r in out["results"]}
  assert rows == {(m, w, a) for m in methods for w, a in pairs}
  for r in out["results"]:
    assert 0.0 <= r["accuracy"] <= 1.0
  assert out["lambdas"] == {"l1": 0.05, "l2": 5.0}
  assert set(out["fd_cosines"]) == {"base_s0"}
  assert os.path.getsize(os.path.join(workdir, "study.md")) > 0


# Tiny models of the configs' architecture families: compiles dominate these
# runs, and a graph's compile time grows with its depth, not its width.
# tiny_resnet is the ResNet-18 code with two stages of one block (the
# stride-2 block and its projection shortcut run) and either stem. (Setting
# model_kwargs.stage_sizes on resnet18_* instead does not work: the run's
# saved config turns the tuple into a list, which PTQ's rebuilt model cannot
# hash.)
TINY_MODELS = {
  "vgg": {"width_multiplier": 1 / 32},
  "resnet18": {"num_filters": 4, "stem": "cifar"},
  "imagenet": {"num_filters": 4, "stem": "imagenet"},
}


def _tiny_model(config, family: str) -> None:
  if family != "vgg":
    config.train.model = "tiny_resnet"
  config.train.model_kwargs.update(TINY_MODELS[family])


# Each reduced study trains 7–8 runs (each compiled), PTQ and the FD check:
# about a CPU-minute each, mostly compiling.
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vgg", "resnet18"])
def test_cifar10_table1_reduced_study(tmp_path, arch):
  config = cifar10_table1.get_config(arch)
  _tiny(config, batch=8, minival=8, train=16, test=8)
  _tiny_model(config, arch)
  with tfds.testing.mock_data(
    num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE
  ):
    _run_and_check(config, str(tmp_path / "study"), CIFAR_METHODS)


@pytest.mark.slow
def test_imagenet_table2_reduced_study(tmp_path):
  config = imagenet_table2.get_config()
  # ImageNet inputs are always 224×224 crops: a tiny net, tiny batches.
  _tiny(config, batch=4, minival=4, train=8, test=4)
  _tiny_model(config, "imagenet")
  with tfds.testing.mock_data(
    num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE
  ):
    _run_and_check(config, str(tmp_path / "study"), IMAGENET_METHODS)
