"""drpo: an offline replay trainer for LLM reinforcement learning.

Audits logged rollouts for staleness and trust-region violations (`drpo inspect`) and runs
off-policy update passes with DRPO and its peers on a Hugging Face causal LM (`drpo train`).
"""

__version__ = "0.1.0"
