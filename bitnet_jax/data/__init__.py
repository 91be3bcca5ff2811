"""Training data: document sources, tokenizers, the grain pipeline."""
