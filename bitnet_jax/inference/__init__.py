"""Inference: loading a trained run, exported integer weights, generation."""
