"""GGUF files for llama.cpp (its BitNet architecture): layout.py names, the
TQ2_0 ternary blocks and the vocabulary; writer.py `export --format=gguf`."""
