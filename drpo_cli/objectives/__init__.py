"""Objectives: every loss and its gradient weight, corrections, and the mergeable diagnostics."""
