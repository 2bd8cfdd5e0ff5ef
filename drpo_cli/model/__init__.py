"""Model runtime: the log-prob engine, vocabulary parallelism, MoE routing, LoRA, checkpoints, FSDP2."""
