"""Rollouts in: schema v1 and its validator, loading rows, the RolloutWriter, engine adapters, convert."""
