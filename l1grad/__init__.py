"""l1grad: gradient l1 regularization for quantization robustness, in JAX/Flax.

Train one set of float weights that can be quantized after training, on the
fly, to any bit-width (Alizadeh et al., ICLR 2020).
"""

__version__ = "0.1.0"
