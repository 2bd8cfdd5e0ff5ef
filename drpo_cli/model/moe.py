"""Mixture-of-experts routing: the sampler's logged expert choices, their mismatch, their replay (SPEC.md §3, §2, §1).

The `routed_experts` column holds, per row, one entry per position the sampler ran forward on
(prompt + response − 1 positions), each a list over MoE layers of the k expert ids it chose.
Two things use it, both through a forward hook on every MoE block's router (transformers 5 MoE
routers return `(router_logits, top-k weights, top-k ids)`):

- audit: the router's own top-k set is compared with the logged set at the positions predicting
  trained tokens → `moe/routing_mismatch_frac`, per layer too;
- replay (R3, "rollout routing replay"): the block computes with the logged experts; their gate
  weights are the current router's probabilities at those experts, normalised as the architecture
  normalises its own top-k, so the router still gets gradients.

A logged entry with no layers (an empty list) means "not logged" (vLLM's
`routed_experts_prompt_start` skips the start of a prompt): there the router picks as usual.
The routing of a micro-batch is set with `feed()` before its body pass and left in place, so that
gradient checkpointing's recompute in backward sees the same routing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from drpo_cli.base.errors import CheckpointError, ConfigError, InputError

UNLOGGED = -1  # expert id of a position whose routing was not logged (and of padding positions)


@dataclass(frozen=True)
class _Rule:
    """How an architecture turns router probabilities at its top-k into gate weights."""

    renorm: str  # "always", "never" or "config" (config.norm_topk_prob)
    cast: bool  # weights cast back to the logits' dtype (Qwen, OLMoE) or kept float32 (Mixtral)


# model_type -> (router class name, rule). Every router: logits = x Wᵀ; p = softmax(logits) in float32;
# top-k of p; optionally p_topk / Σ p_topk (Mixtral's "softmax over the top-k logits" is the same thing).
ARCHITECTURES: dict[str, tuple[str, _Rule]] = {
    "qwen3_moe": ("Qwen3MoeTopKRouter", _Rule("config", True)),
    "qwen2_moe": ("Qwen2MoeTopKRouter", _Rule("config", True)),
    "mixtral": ("MixtralTopKRouter", _Rule("always", False)),
    "olmoe": ("OlmoeTopKRouter", _Rule("config", True)),
    "qwen3_5_moe_text": ("Qwen3_5MoeTopKRouter", _Rule("always", True)),
}
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class MoeSpec:
    """What the logged routing must match: the MoE layers, k and the number of experts."""

    model_type: str
    layers: tuple[int, ...]  # decoder layer index of each MoE layer, in order
    num_hidden_layers: int
    top_k: int
    num_experts: int
    norm_topk_prob: bool

    @classmethod
    def of(cls, config) -> MoeSpec | None:
        """From a model config (no weights); None for a dense model. ConfigError for an MoE
        architecture whose routing drpo cannot replay or audit."""
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        experts = next((int(getattr(cfg, k)) for k in _EXPERT_KEYS if getattr(cfg, k, None)), 0)
        if experts <= 0:
            return None
        model_type = str(getattr(cfg, "model_type", ""))
        if model_type not in ARCHITECTURES:
            raise ConfigError(
                f"routing: architecture {model_type!r} ({', '.join(getattr(config, 'architectures', None) or [])}) "
                f"is a mixture of experts drpo cannot replay or audit; supported: {', '.join(ARCHITECTURES)}")
        n = int(cfg.num_hidden_layers)
        sparse = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
        dense = set(getattr(cfg, "mlp_only_layers", None) or ())
        layers = tuple(i for i in range(n) if i not in dense and (i + 1) % sparse == 0)
        return cls(model_type, layers, n, int(cfg.num_experts_per_tok), experts,
                   bool(getattr(cfg, "norm_topk_prob", True)))

    @property
    def rule(self) -> _Rule:
        return ARCHITECTURES[self.model_type][1]


def routers(model: torch.nn.Module, spec: MoeSpec) -> list[torch.nn.Module]:
    """The router module of every MoE layer, in layer order (CheckpointError if they are not where expected)."""
    name = ARCHITECTURES[spec.model_type][0]
    layers = model.get_decoder().layers
    found = []
    for i in spec.layers:
        gate = getattr(getattr(layers[i], "mlp", None), "gate", None)
        base = gate.get_base_layer() if hasattr(gate, "get_base_layer") else gate  # under a LoRA wrapper
        if type(base).__name__ != name:
            raise CheckpointError(f"{type(model).__name__}: expected a {name} at layer {i}'s mlp.gate, "
                                  f"found {type(base).__name__}")
        found.append(gate)  # the outermost module: its output is what the block uses
    return found


def replay_weights(logits: torch.Tensor, ids: torch.Tensor, rule: _Rule, norm_topk_prob: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N, k) sorted by current probability, gate weights (N, k)) of the experts `ids` (N, k).

    The weights are the current router's softmax probabilities at those experts, renormalised over
    them as the architecture renormalises its own top-k. Sorting by probability (descending, as
    torch.topk orders) makes replaying the router's own choice bit-identical to not replaying.
    """
    probs = F.softmax(logits, dim=-1, dtype=torch.float)  # (N, E)
    picked = probs.gather(1, ids)  # (N, k)
    picked, order = picked.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, order)
    if rule.renorm == "always" or (rule.renorm == "config" and norm_topk_prob):
        picked = picked / picked.sum(dim=-1, keepdim=True)
    return ids, (picked.to(logits.dtype) if rule.cast else picked)


@dataclass
class RoutingState:
    """Per model: the current micro-batch's logged routing and what the hooks found in it."""

    spec: MoeSpec
    replay: bool
    routing: torch.Tensor | None = None  # (B·L, n_layers, k) logged ids of the current micro-batch, -1 = not logged
    src_index: torch.Tensor | None = None  # (M,) positions predicting the micro-batch's response tokens
    mismatch: list[torch.Tensor | None] = field(default_factory=list)  # per layer (M,) bool, own set ≠ logged set
    handles: list = field(default_factory=list)
    step: MismatchCount | None = None  # training: the current step's mismatch counts

    def hook(self, layer: int):
        def on_router(module, args, output):
            if self.routing is None:
                return None
            logits, _, own = output  # (N, E), (N, k), (N, k)
            logged = self.routing[:, layer].to(torch.int64)  # (N, k)
            if logged.shape[0] != own.shape[0]:
                raise RuntimeError(f"routing replay: {own.shape[0]} positions reach MoE layer "
                                   f"{self.spec.layers[layer]}, the micro-batch's routing has {logged.shape[0]}")
            if self.src_index is not None:
                at = self.src_index
                self.mismatch[layer] = (own[at].sort(-1).values != logged[at].sort(-1).values).any(-1)  # (M,)
            if not self.replay:
                return None
            have = logged[:, :1] >= 0  # (N, 1)
            ids, weights = replay_weights(logits, torch.where(have, logged, own), self.spec.rule,
                                          self.spec.norm_topk_prob)
            return logits, weights, ids
        return on_router


_ATTR = "_drpo_routing"


def install(model: torch.nn.Module, spec: MoeSpec, *, replay: bool) -> RoutingState:
    """Hook every MoE router of `model` (also under FSDP2: the hooks sit on the routers inside the
    wrapped layers); `feed()` then gives each micro-batch's logged routing."""
    remove(model)
    state = RoutingState(spec, replay, mismatch=[None] * len(spec.layers))
    for j, gate in enumerate(routers(model, spec)):
        state.handles.append(gate.register_forward_hook(state.hook(j)))
    model.__dict__[_ATTR] = state
    return state


def remove(model: torch.nn.Module) -> None:
    state = model.__dict__.pop(_ATTR, None)
    for h in state.handles if state is not None else ():
        h.remove()


def feed(model: torch.nn.Module, mb) -> RoutingState | None:
    """Set micro-batch `mb`'s logged routing for the hooks (no-op when none are installed); it stays
    set until the next micro-batch, so a recompute in backward routes the same way."""
    state = model.__dict__.get(_ATTR)
    if state is None:
        return None
    routing = getattr(mb, "routed_experts", None)  # (B, L, n_layers, k)
    state.routing = None if routing is None else routing.reshape(-1, *routing.shape[2:])
    state.src_index = None if routing is None else mb.src_index
    state.mismatch = [None] * len(state.spec.layers)
    return state


def mismatch_of(model: torch.nn.Module) -> torch.Tensor | None:
    """(M, n_layers) bool of the last fed micro-batch: the router's own top-k set ≠ the logged set at
    the position predicting each response token (None without hooks or logged routing)."""
    state = model.__dict__.get(_ATTR)
    if state is None or state.routing is None or any(m is None for m in state.mismatch):
        return None
    return torch.stack(state.mismatch, dim=1)  # (M, n_layers)


def logged_positions(mb) -> torch.Tensor:
    """(M,) bool: the position predicting each response token has logged routing."""
    flat = mb.routed_experts.reshape(-1, *mb.routed_experts.shape[2:])  # (B·L, n_layers, k)
    return flat[mb.src_index, 0, 0] >= 0


# ---- the column against a checkpoint ------------------------------------------------------------


def check_routing(rows, spec: MoeSpec | None, model_dir: str):
    """Rows whose `routed_experts` fit `spec` (layers, k, expert ids), as the model's MoE layers.

    A logged layer axis over every decoder layer (vLLM's own shape) is reduced to the MoE layers.
    InputError naming the first row that does not fit; rows unchanged without the column.
    """
    routing = rows.routed_experts
    if routing is None:
        return rows
    where = f"(the MoE layers of {model_dir})"
    first = rows.source_file[0] if rows.num_rows else model_dir
    if spec is None:  # the column is not used (plan_routing)
        from dataclasses import replace
        return replace(rows, routed_experts=None)
    n_layers, k = routing.shape[1], routing.shape[2]
    if n_layers == spec.num_hidden_layers and n_layers != len(spec.layers):
        routing = routing[:, list(spec.layers)]
    elif n_layers != len(spec.layers):
        raise InputError(f"{first}: column 'routed_experts': expected {len(spec.layers)} layers per position "
                         f"{where}, found {n_layers}")
    if k != spec.top_k:
        raise InputError(f"{first}: column 'routed_experts': expected {spec.top_k} expert ids per layer "
                         f"(num_experts_per_tok of {model_dir}), found {k}")
    bad = np.flatnonzero((routing >= spec.num_experts).any(axis=(1, 2)))
    if bad.size:
        offsets = rows.routing_offsets()
        r = int(np.searchsorted(offsets, bad[0], "right") - 1)
        raise InputError(f"{rows.source_file[r]}, column 'routed_experts', row {int(rows.source_row[r])} "
                         f"(sample_id '{rows.sample_ids[r]}'): expected expert ids in [0, {spec.num_experts}) "
                         f"{where}, found {int(routing[bad[0]].max())} at position {int(bad[0] - offsets[r])}")
    from dataclasses import replace
    return replace(rows, routed_experts=np.ascontiguousarray(routing))


@torch.no_grad()
def own_routing(model: torch.nn.Module, spec: MoeSpec, input_ids: torch.Tensor) -> np.ndarray:
    """(L, n_layers, k) expert ids the model's own routers choose for a sequence `input_ids` (L,), or
    (B, L, n_layers, k) for a batch (B, L) of equal-length sequences: what a sampler running this
    model logs (tests, benchmarks/moe_replay.py)."""
    found: list[torch.Tensor] = [None] * len(spec.layers)  # type: ignore[list-item]

    def keep(j):
        def hook(module, args, output):
            found[j] = output[2]
        return hook

    batch = input_ids if input_ids.dim() == 2 else input_ids[None]  # (B, L)
    handles = [g.register_forward_hook(keep(j)) for j, g in enumerate(routers(model, spec))]
    try:
        model.get_decoder()(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    ids = torch.stack(found, dim=1).reshape(*batch.shape, len(spec.layers), -1)  # (B, L, n_layers, k)
    return (ids if input_ids.dim() == 2 else ids[0]).cpu().numpy().astype(np.int16)


def plan_routing(model_dir: str, columns: set[str], *, replay: bool, allow_unsafe: bool = False
                 ) -> tuple[MoeSpec | None, str | None]:
    """Before any work: (the checkpoint's MoE spec when the rollouts carry `routed_experts`, else None;
    a note when the column is there but cannot be used).

    With --replay-routing, a missing column, a dense checkpoint or an MoE architecture drpo cannot
    route is refused (ConfigError / InputError); without it they only leave the column unused.
    """
    if "routed_experts" not in columns:
        if replay:
            raise ConfigError("--replay-routing: the rollouts have no column 'routed_experts' (the sampler's expert "
                              "ids; vLLM: enable_return_routed_experts)")
        return None, None
    from pathlib import Path

    from drpo_cli.model.checkpoint import read_config

    config = read_config(Path(model_dir), allow_unsafe)
    try:
        spec = MoeSpec.of(config)
    except ConfigError as err:
        if replay:
            raise ConfigError(f"--replay-routing: {err.message}") from None
        return None, f"column routed_experts not audited: {err.message}"
    if spec is None:
        why = f"{model_dir} is a dense model (no experts in its config)"
        if replay:
            raise InputError(f"--replay-routing: column 'routed_experts' needs a mixture-of-experts checkpoint; {why}")
        return None, f"column routed_experts not used: {why}"
    return spec, None


class MismatchCount:
    """Running counts of `moe/routing_mismatch_frac` over the positions predicting trained tokens."""

    def __init__(self, spec: MoeSpec):
        self.spec = spec
        self.counts = np.zeros(len(spec.layers) + 2, dtype=np.int64)  # per-layer mismatches, positions, unlogged

    def add(self, model: torch.nn.Module, mb, trained: torch.Tensor) -> None:
        """After micro-batch `mb`'s pass: its mismatches at the positions of `trained` (M,) bool tokens."""
        found = mismatch_of(model)
        if found is None:
            return
        logged = logged_positions(mb).cpu()  # (M,)
        use = trained & logged
        self.counts[:-2] += found.cpu()[use].sum(0).numpy()
        self.counts[-2] += int(use.sum())
        self.counts[-1] += int((trained & ~logged).sum())

    def result(self, counts: np.ndarray | None = None, *, replayed: bool) -> tuple[float | None, dict]:
        """(moe/routing_mismatch_frac, the report's `routing` section) from counts (summed over ranks)."""
        c = self.counts if counts is None else counts
        positions = int(c[-2])
        by_layer = [{"layer": layer, "mismatch_frac": (int(n) / positions if positions else None)}
                    for layer, n in zip(self.spec.layers, c[:-2])]
        frac = float(c[:-2].sum()) / (positions * len(self.spec.layers)) if positions else None
        return frac, {"architecture": self.spec.model_type, "layers": len(self.spec.layers), "top_k": self.spec.top_k,
                      "num_experts": self.spec.num_experts, "replayed": replayed, "positions": positions,
                      "unlogged_positions": int(c[-1]), "mismatch_frac": frac, "by_layer": by_layer}


def count_trained(model: torch.nn.Module, mb, trained: torch.Tensor) -> None:
    """Training: add micro-batch `mb`'s routing mismatches at its trained tokens (M,) to the step's count."""
    state = model.__dict__.get(_ATTR)
    if state is None:
        return
    if state.step is None:
        state.step = MismatchCount(state.spec)
    state.step.add(model, mb, trained.cpu())


def step_metrics(model: torch.nn.Module) -> dict[str, float | None]:
    """{"moe/routing_mismatch_frac": the step's share over every rank's trained positions} and a fresh
    count; {} without routing hooks. Under torchrun every rank calls it (an all-reduce)."""
    from drpo_cli.model import distributed

    state = model.__dict__.get(_ATTR)
    if state is None:
        return {}
    count = state.step or MismatchCount(state.spec)
    state.step = None
    frac, _ = count.result(distributed.all_reduce_sum(torch.from_numpy(count.counts)).numpy(), replayed=state.replay)
    return {"moe/routing_mismatch_frac": frac}
