"""`drpo inspect`: the data audit, the model audit and the two-sampler comparison."""
