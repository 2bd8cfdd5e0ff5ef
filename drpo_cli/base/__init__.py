"""Foundations: exit codes and errors, test hooks, torchrun detection, the output rule, per-value tables."""
