"""Hugging Face BitNet checkpoints (transformers' BitNetForCausalLM layout):
layout.py names, shapes and the 2-bit packing; weights.py maps them onto
bitnet_jax parameters."""
