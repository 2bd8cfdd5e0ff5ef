"""drpo: an offline replay trainer for LLM reinforcement learning.

Audits logged rollouts for staleness and trust-region violations (`drpo inspect`) and runs
off-policy update passes with DRPO and its peers on a Hugging Face causal LM (`drpo train`).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from drpo_cli import RolloutWriter` without importing pyarrow for `drpo --help`.
    if name == "RolloutWriter":
        from drpo_cli.rollouts.writer import RolloutWriter

        return RolloutWriter
    raise AttributeError(f"module 'drpo_cli' has no attribute {name!r}")
