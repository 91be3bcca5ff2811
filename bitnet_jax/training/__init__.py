"""The training run: step functions, optimizer schedules, checkpoints, metrics, the loop."""
