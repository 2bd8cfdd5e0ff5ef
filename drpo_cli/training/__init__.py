"""`drpo train`: the update passes, resume state and the training report."""
