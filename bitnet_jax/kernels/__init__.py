"""Pallas kernels behind the same functions as the jnp reference: Mosaic on
TPU, Triton on GPU, `interpret=True` on CPU (the tests' path)."""
