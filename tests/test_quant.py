"""Tests for l1grad.quant: the fake quantizer and batch-norm folding."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l1grad import quant

BITS = range(2, 9)


def np_grid(bits: int, signed: bool) -> tuple[int, int]:
    hi = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    return (-hi if signed else 0), hi


def np_fake_quant(x, bits, scale, signed):
    lo, hi = np_grid(bits, signed)
    x = np.asarray(x, np.float32)
    scale = np.asarray(scale, np.float32)
    return np.clip(np.round(x / scale), lo, hi) * scale


def np_scale(x, bits, signed, axis):
    x = np.asarray(x, np.float32)
    reduce = None if axis is None else tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    keep = axis is not None
    rmax = np.max(np.abs(x), reduce, keepdims=keep) if signed else np.maximum(np.max(x, reduce, keepdims=keep), 0)
    return rmax / np.float32(np_grid(bits, signed)[1])


@pytest.fixture(scope="module")
def weights() -> np.ndarray:
    # Per-channel magnitudes differ, so per-channel and per-tensor scales differ.
    rng = np.random.default_rng(0)
    return (rng.normal(size=(3, 3, 4, 5)) * np.array([0.1, 1, 3, 0.5, 2])).astype(np.float32)


# ---------------------------------------------------------------------------
# fake_quant and friends.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("axis", [None, -1])
def test_fake_quant_matches_numpy(weights, signed, axis):
    x = weights
    for bits in BITS:
        scale = quant.symmetric_scale(x, bits, signed=signed, axis=axis)
        np.testing.assert_allclose(scale, np_scale(x, bits, signed, axis), rtol=1e-6)
        expected_shape = () if axis is None else (1, 1, 1, x.shape[-1])
        assert scale.shape == expected_shape
        q = quant.fake_quant(x, bits, scale, signed=signed)
        np.testing.assert_allclose(q, np_fake_quant(x, bits, scale, signed), rtol=1e-6, atol=0)
        # Codes: integers, inside the grid, and the same codes fake_quant used.
        codes = quant.quantize_to_int(x, bits, scale, signed=signed)
        assert codes.dtype == jnp.int32
        lo, hi = np_grid(bits, signed)
        assert codes.min() >= lo and codes.max() <= hi
        np.testing.assert_array_equal(np.asarray(codes, np.float32) * np.asarray(scale), q)
        # The range-defining element lands on the outermost code.
        reduce = None if axis is None else (0, 1, 2)
        np.testing.assert_array_equal(np.abs(np.asarray(codes)).max(reduce), hi)
        if not signed:
            assert codes.min() == 0  # negative inputs clip to 0 on the unsigned grid


def test_grid_max():
    for bits in BITS:
        assert quant.grid_max(bits) == 2 ** (bits - 1) - 1
        assert quant.grid_max(jnp.float32(bits), signed=False) == 2**bits - 1


def test_round_half_to_even_and_clip():
    x = jnp.array([0.5, 1.5, 2.5, -0.5, -2.5, 100.0, -100.0])
    np.testing.assert_array_equal(quant.quantize_to_int(x, 4, 1.0), [0, 2, 2, 0, -2, 7, -7])
    np.testing.assert_array_equal(quant.quantize_to_int(x, 4, 1.0, signed=False), [0, 2, 2, 0, 0, 15, 0])


def test_zero_scale_is_nan_free():
    x = jnp.zeros((4, 3))
    for signed in (True, False):
        for ste in (False, True):

            def f(x, signed=signed, ste=ste):
                return jnp.sum(quant.fake_quant(x, 4, quant.symmetric_scale(x, 4, signed=signed), signed=signed, ste=ste))

            np.testing.assert_array_equal(quant.fake_quant(x, 4, 0.0, signed=signed, ste=ste), 0.0)
            assert np.all(np.isfinite(jax.grad(f)(x)))
    # Per-channel: one dead channel must not poison the others.
    x = jnp.array([[0.0, 1.0], [0.0, -3.0]])
    q = quant.fake_quant(x, 3, quant.symmetric_scale(x, 3, axis=-1))
    np.testing.assert_array_equal(q, x)
    np.testing.assert_array_equal(quant.quantize_to_int(jnp.ones(3), 4, 0.0), 0)


def test_ste_forward_equals_plain_and_gradient_is_clipped_identity():
    x = jnp.linspace(-3.0, 3.0, 61)
    scale, bits = 0.25, 3  # range [-0.75, 0.75]
    plain = quant.fake_quant(x, bits, scale)
    ste = quant.fake_quant(x, bits, scale, ste=True)
    np.testing.assert_array_equal(ste, plain)  # bit for bit
    inside = np.abs(np.asarray(x)) <= 0.75 + 1e-7
    g = jax.grad(lambda x: jnp.sum(quant.fake_quant(x, bits, scale, ste=True)))(x)
    np.testing.assert_array_equal(g, inside.astype(np.float32))
    # Plain rounding has zero derivative.
    g0 = jax.grad(lambda x: jnp.sum(quant.fake_quant(x, bits, scale)))(x)
    np.testing.assert_array_equal(g0, 0.0)


def test_ste_gradient_at_range_defining_element(weights):
    # With scale = max|x| / hi the extreme element sits exactly on the bound; it
    # is inside the range and must get the full gradient, not half of it.
    x = jnp.asarray(weights)
    g = jax.grad(lambda x: jnp.sum(quant.fake_quant(x, 4, quant.symmetric_scale(x, 4, axis=-1), ste=True)))(x)
    np.testing.assert_array_equal(g, 1.0)


def test_ste_is_forward_mode_differentiable(weights):
    x = jnp.asarray(weights)
    scale = 0.8 * quant.symmetric_scale(x, 4)  # some values clipped
    inside = (np.abs(weights) <= 7 * float(scale)).astype(np.float32)
    t = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)

    def loss(x):
        return jnp.sum(quant.fake_quant(x, 4, scale, ste=True) ** 2)

    _, tangent = jax.jvp(lambda x: quant.fake_quant(x, 4, scale, ste=True), (x,), (t,))
    np.testing.assert_allclose(tangent, t * inside)
    # Forward-over-reverse HVP (the default penalty-gradient path):
    # grad = 2·q·inside, so H·t = 2·t·inside.
    _, hvp = jax.jvp(jax.grad(loss), (x,), (t,))
    np.testing.assert_allclose(hvp, 2 * t * inside, rtol=1e-6)
    hvp_rr = jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), t))(x)
    np.testing.assert_allclose(hvp_rr, hvp, rtol=1e-6)


def test_one_trace_serves_a_bit_width_sweep(weights):
    x = jnp.asarray(weights)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def evaluate(x, bits):
        q_w = quant.fake_quant(x, bits, quant.symmetric_scale(x, bits, axis=-1))
        q_a = quant.fake_quant(x, bits, quant.symmetric_scale(x, bits, signed=False), signed=False, ste=True)
        return q_w, q_a

    for bits in BITS:
        q_w, q_a = evaluate(x, jnp.asarray(bits, jnp.int32))
        np.testing.assert_array_equal(q_w, quant.fake_quant(x, bits, quant.symmetric_scale(x, bits, axis=-1)))
        assert len(np.unique(np.asarray(q_a))) <= 2**bits
    chex.clear_trace_counter()


# ---------------------------------------------------------------------------
# Batch-norm folding.
# ---------------------------------------------------------------------------


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(6, (3, 3), use_bias=True)(x)
        x = nn.BatchNorm(use_running_average=not train, use_scale=False, epsilon=1e-3)(x)
        return nn.relu(x)


class _Net(nn.Module):
    """Every folding case: BN on the input (unfoldable), Conv(no bias)→BN,
    a nested Conv(bias)→BN(no scale), Dense→BN(no bias)."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train, name="bn_in")(x)
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = _Block()(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(8)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, use_bias=False, epsilon=1e-4)(x))
        return nn.Dense(3)(x)


def _randomize_bn(variables, seed=0):
    """Non-trivial BN statistics and affine params, so folding is really tested."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        shape = np.shape(leaf)
        if name == "mean":
            return jnp.asarray(rng.normal(size=shape), leaf.dtype)
        if name == "var":
            return jnp.asarray(rng.uniform(0.3, 3.0, size=shape), leaf.dtype)
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 2.0, size=shape) * rng.choice([-1, 1], size=shape), leaf.dtype)
        if name == "bias" and any("BatchNorm" in str(k) or "bn_in" in str(k) for k in path):
            return jnp.asarray(rng.normal(size=shape), leaf.dtype)
        if name == "bias":  # conv/dense bias: non-zero too
            return jnp.asarray(rng.normal(size=shape) * 0.1, leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(draw, variables)


@pytest.fixture(scope="module")
def net_and_vars():
    model = _Net()
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 6, 3)), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    return model, _randomize_bn(variables), x


def test_find_conv_bn_pairs(net_and_vars):
    model, variables, x = net_and_vars
    pairs = quant.find_conv_bn_pairs(model, variables, x, train=False)
    assert pairs == {
        ("Conv_0",): quant.BatchNormLink(("BatchNorm_0",), 1e-5),
        ("_Block_0", "Conv_0"): quant.BatchNormLink(("_Block_0", "BatchNorm_0"), 1e-3),
        ("Dense_0",): quant.BatchNormLink(("BatchNorm_1",), 1e-4),
    }


def test_folded_model_matches_unfolded(net_and_vars):
    model, variables, x = net_and_vars
    pairs = quant.find_conv_bn_pairs(model, variables, x, train=False)
    folded = quant.fold_batch_norm(variables, pairs)
    expected = model.apply(variables, x, train=False)
    # The folded BNs' variables are gone; the input BN keeps its own.
    assert set(folded.params) == {"bn_in", "Conv_0", "_Block_0", "Dense_0", "Dense_1"}
    assert set(folded.params["_Block_0"]) == {"Conv_0"}
    assert set(folded.state["batch_stats"]) == {"bn_in"}
    assert set(folded.biases) == {("Conv_0",)}  # the only paired layer without bias
    # The caller's variables are untouched.
    assert "BatchNorm_0" in variables["params"]
    got = quant.folded_apply(model, folded, x, train=False)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # A pytree with static pairs: jit over it works.
    jitted = jax.jit(lambda f, x: quant.folded_apply(model, f, x, train=False))
    np.testing.assert_allclose(jitted(folded, x), expected, rtol=1e-5, atol=1e-5)


def test_folding_composes_with_an_outer_interceptor(net_and_vars):
    # Post-training quantization will wrap folded_apply in its own interceptor
    # on Conv/Dense inputs; it must run, and must see the folded layers.
    model, variables, x = net_and_vars
    folded = quant.fold_batch_norm(variables, quant.find_conv_bn_pairs(model, variables, x, train=False))
    seen = []

    def outer(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, (nn.Conv, nn.Dense)):
            seen.append(context.module.path)
            return next_fun(args[0] * 1.0, *args[1:], **kwargs)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(outer):
        got = quant.folded_apply(model, folded, x, train=False)
    assert sorted(seen) == [("Conv_0",), ("Dense_0",), ("Dense_1",), ("_Block_0", "Conv_0")]
    np.testing.assert_allclose(got, model.apply(variables, x, train=False), rtol=1e-5, atol=1e-5)


class _Unfoldable(nn.Module):
    """Layer outputs with a second reader, and a BN on a non-channel axis."""

    @nn.compact
    def __call__(self, x, train: bool):
        y = nn.Conv(4, (1, 1))(x)
        z = nn.BatchNorm(use_running_average=not train)(y)
        w = nn.Conv(4, (1, 1))(y)  # second reader of y: folding would change w
        v = nn.Dense(4)(z + w)
        u = nn.BatchNorm(use_running_average=not train, axis=1)(v)  # not the channel axis
        return u


def test_unfoldable_patterns_are_not_paired():
    model = _Unfoldable()
    x = jnp.ones((2, 3, 3, 2))
    variables = _randomize_bn(jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x))
    pairs = quant.find_conv_bn_pairs(model, variables, x, train=False)
    assert pairs == {}
    folded = quant.fold_batch_norm(variables, pairs)
    np.testing.assert_allclose(
        quant.folded_apply(model, folded, x, train=False), model.apply(variables, x, train=False), rtol=1e-6
    )
