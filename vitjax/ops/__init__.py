"""Pure jax.numpy math: arrays in, arrays out, no parameters, no config reads.

Every function here is importable by any JAX project (Flax Linen, NNX, Equinox)
and is the oracle the Linen wrappers in `vitjax.models` and the optional kernels
in `vitjax.kernels` are tested against.
"""
