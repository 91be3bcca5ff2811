"""Experiments built on bitnet_jax (the paper in miniature)."""
