"""The columns each pass of `drpo inspect` reads, and the --by columns outside the schema."""

from __future__ import annotations

from drpo_cli.rollouts.schema import COLUMN_BY_NAME

DATA_COLUMNS = ("prompt_ids", "response_ids", "behavior_logprobs", "advantages", "advantage", "reward",
                "group_id", "loss_mask", "sample_id", "policy_version", "temperature", "token_policy_versions")
VERSION_COLUMNS = ("policy_version", "token_policy_versions", "loss_mask")
MODEL_COLUMNS = ("prompt_ids", "response_ids", "behavior_logprobs", "advantages", "advantage", "reward", "group_id",
                 "loss_mask", "sample_id", "policy_version", "temperature",
                 "token_policy_versions", "routed_experts")  # what the model pass reads
PLAN_COLUMNS = ("policy_version", "temperature", "loss_mask", "token_policy_versions", "routed_experts")  # the light pass over every row


def extra_columns(read: dict[str, str]) -> tuple[str, ...]:
    """The --by columns outside the schema (read as logged, iter_batches' `extra`)."""
    return tuple(c for c in read.values() if c not in COLUMN_BY_NAME)
