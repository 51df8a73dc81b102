"""Pieces of the training loop (`glore_jax.trainer`): config schema, inputs, state and steps,
checkpoints, metrics."""
