"""Tests for l1grad.params: kernel paths, layer names, split and merge."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import pytest

from l1grad import params as params_lib


def _params():
  return {
    "Conv_0": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.zeros(2)},
    "Block_0": {
      "Conv_1": {"kernel": jnp.full((1, 1, 2, 2), 2.0)},
      "BatchNorm_0": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
    },
    "Dense_0": {"kernel": jnp.full((2, 3), 3.0)},
  }


def test_layer_name_of_key_paths_and_module_paths():
  [(path, _)], _ = jax.tree_util.tree_flatten_with_path(
    {"Block_0": {"Conv_1": {"kernel": 0}}}
  )
  assert params_lib.layer_name(path) == "Block_0/Conv_1/kernel"
  assert params_lib.layer_name(path[:-1]) == "Block_0/Conv_1"
  assert params_lib.layer_name(("Block_0", "Conv_1")) == "Block_0/Conv_1"
  assert params_lib.layer_name(()) == ""


def test_is_kernel_path():
  flat, _ = jax.tree_util.tree_flatten_with_path(_params())
  kernels = [
    params_lib.layer_name(p) for p, _ in flat if params_lib.is_kernel_path(p)
  ]
  assert kernels == ["Block_0/Conv_1/kernel", "Conv_0/kernel", "Dense_0/kernel"]
  assert not params_lib.is_kernel_path(())


def test_split_kernels_by_layer_name_in_leaf_order_and_merge():
  tree = _params()
  kernels, merge = params_lib.split_kernels(tree)
  assert list(kernels) == ["Block_0/Conv_1", "Conv_0", "Dense_0"]
  assert kernels["Dense_0"] is tree["Dense_0"]["kernel"]
  chex.assert_trees_all_equal(merge(kernels), tree)
  chex.assert_trees_all_equal(merge({}), tree)
  moved = merge({"Conv_0": jnp.zeros((3, 3, 1, 2))})
  expected = _params()
  expected["Conv_0"]["kernel"] = jnp.zeros((3, 3, 1, 2))
  chex.assert_trees_all_equal(moved, expected)
  with pytest.raises(KeyError, match="Conv_9"):
    merge({"Conv_9": jnp.zeros(1)})


def test_split_kernels_rejects_two_kernels_with_one_name():
  tree = {"x": [{"kernel": jnp.ones(1)}], "x/0": {"kernel": jnp.ones(1)}}
  with pytest.raises(ValueError, match="x/0"):
    params_lib.split_kernels(tree)
