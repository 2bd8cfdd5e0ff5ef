"""The `routed_experts` column from inference engines (no torch: adapters and `convert` import it).

vLLM 0.33 (`LLM(..., enable_return_routed_experts=True)`) returns `CompletionOutput.routed_experts`,
a numpy array [positions, layers, top_k] (uint8; uint16 above 256 experts) over every decoder layer,
for the positions `SamplingParams.routed_experts_prompt_start` … prompt + response − 2: every
position the engine ran forward on, the last sampled token excluded (its routing was never
computed). `drpo_cli/model/moe.py` audits and replays it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from drpo_cli.base.errors import InputError


def routed_experts_from_vllm(completion: Any, prompt_len: int, *, prompt_start: int | None = None,
                             moe_layers: list[int] | None = None) -> list | None:
    """The column's value for one vLLM completion (object or its JSON dump), or None without routing.

    The prompt positions vLLM skipped (`routed_experts_prompt_start`; inferred from the array's
    length when not given) become empty entries: not logged, routed by the trainer's own router.
    `moe_layers` keeps only those layers; else every layer is kept and drpo picks the MoE layers
    of the checkpoint (a dense layer's entries are meaningless).
    """
    routed = completion.get("routed_experts") if isinstance(completion, dict) else \
        getattr(completion, "routed_experts", None)
    if routed is None:
        return None
    arr = np.asarray(routed)
    if arr.ndim != 3:
        raise InputError(f"vLLM routed_experts: expected an array [positions, layers, top_k], found shape {arr.shape}")
    token_ids = completion.get("token_ids") if isinstance(completion, dict) else completion.token_ids
    positions = prompt_len + len(token_ids) - 1
    start = positions - arr.shape[0] if prompt_start is None else prompt_start
    if not 0 <= start <= prompt_len or start + arr.shape[0] != positions:
        raise InputError(f"vLLM routed_experts: expected {positions - (prompt_start or 0)} positions (prompt "
                         f"{prompt_len} + response {len(token_ids)} - 1 - routed_experts_prompt_start "
                         f"{prompt_start or 0}), found {arr.shape[0]}")
    if moe_layers is not None:
        arr = arr[:, list(moe_layers)]
    return [[] for _ in range(start)] + arr.astype(np.int64).tolist()
