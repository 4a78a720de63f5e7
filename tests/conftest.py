"""Test-wide JAX settings: CPU compiles are the suite's main cost on 2 cores."""

import jax

# XLA's optimisation passes dominate compile time on small test graphs and do
# not change the math the tests check (flax examples/imagenet does the same).
jax.config.update("jax_disable_most_optimizations", True)
