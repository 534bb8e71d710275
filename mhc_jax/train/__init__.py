"""Training: optimiser (optax), the one train step, checkpoints (orbax), metrics, and the run loop."""
