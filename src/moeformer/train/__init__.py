"""Training: optimiser and schedules, label-smoothed loss, checkpoints, the training loop."""
