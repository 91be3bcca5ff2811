"""Evaluation: perplexity, lm-evaluation-harness tasks, activation statistics."""
