"""Canonical rollout rows in memory: flat CSR numpy arrays, ready for micro-batching. No torch.

Row i's response tokens are `response_ids[response_offsets[i]:response_offsets[i+1]]`; every
per-token array (behavior_logprobs, advantages, loss_mask, proximal_logprobs, token_version) shares
those offsets.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drpo_cli.base.errors import ConfigError, InputError
from drpo_cli.rollouts.files import RolloutSource, Shard, SourceBatch, open_rollouts
from drpo_cli.rollouts.schema import Problem
from drpo_cli.rollouts.validate import validate_rollouts


@dataclass(frozen=True)
class RolloutRows:
    prompt_ids: np.ndarray  # (P,) int64, all prompts concatenated
    prompt_offsets: np.ndarray  # (N+1,) int64
    response_ids: np.ndarray  # (T,) int64, all responses concatenated
    response_offsets: np.ndarray  # (N+1,) int64
    behavior_logprobs: np.ndarray  # (T,) float32, the sampler's log-probs (mu)
    advantages: np.ndarray  # (T,) float32, per token (broadcast / group-relative already applied)
    loss_mask: np.ndarray  # (T,) bool
    proximal_logprobs: np.ndarray | None  # (T,) float32 or None
    sample_ids: list[str]  # (N,)
    policy_version: np.ndarray  # (N,) int64, -1 where unknown
    temperature: np.ndarray  # (N,) float32
    source_file: list[str]  # (N,) file each row came from
    source_row: np.ndarray  # (N,) int64 row index within that file
    global_row: np.ndarray | None = None  # (N,) int64 row index across all files (in order), when loaded
    token_version: np.ndarray | None = None  # (T,) int64 token_policy_versions; None: no file has that column
    # (S, n_layers, k) int16 logged expert ids, S = Σ (prompt + response − 1), −1 where not logged (moe.py)
    routed_experts: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return len(self.sample_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.response_offsets[-1])

    def prompt(self, i: int) -> np.ndarray:
        return self.prompt_ids[self.prompt_offsets[i] : self.prompt_offsets[i + 1]]

    def response(self, i: int) -> np.ndarray:
        return self.response_ids[self.response_offsets[i] : self.response_offsets[i + 1]]

    def response_lengths(self) -> np.ndarray:
        return np.diff(self.response_offsets)  # (N,)

    def prompt_lengths(self) -> np.ndarray:
        return np.diff(self.prompt_offsets)  # (N,)

    def routing_offsets(self) -> np.ndarray:
        """(N+1,) offsets of each row's positions in `routed_experts` (prompt + response − 1 per row)."""
        return _offsets(self.prompt_lengths() + self.response_lengths() - 1)

    def token_row(self) -> np.ndarray:
        """(T,) row index of every response token."""
        return np.repeat(np.arange(self.num_rows, dtype=np.int64), self.response_lengths())

    def token_versions(self) -> np.ndarray:
        """(T,) policy version of every response token: its token_policy_versions entry where the file
        has that column, else its row's policy_version (−1 unknown)."""
        if self.token_version is not None:
            return self.token_version
        return np.repeat(self.policy_version, self.response_lengths())

    def version_range(self) -> tuple[np.ndarray, np.ndarray]:
        """(oldest (N,), newest (N,)) policy version among each row's trained tokens (version_range)."""
        return version_range(self.token_versions(), self.loss_mask, self.response_offsets, self.policy_version)

    def token_position(self) -> np.ndarray:
        """(T,) index of every response token within its response."""
        starts = np.repeat(self.response_offsets[:-1], self.response_lengths())
        return np.arange(self.num_tokens, dtype=np.int64) - starts

    def select(self, indices: np.ndarray) -> RolloutRows:
        """A new RolloutRows holding rows `indices` in that order (copies)."""
        idx = np.asarray(indices, dtype=np.int64)
        p_off, p_take = _gather_ranges(self.prompt_offsets, idx)
        r_off, r_take = _gather_ranges(self.response_offsets, idx)
        return RolloutRows(
            prompt_ids=self.prompt_ids[p_take],
            prompt_offsets=p_off,
            response_ids=self.response_ids[r_take],
            response_offsets=r_off,
            behavior_logprobs=self.behavior_logprobs[r_take],
            advantages=self.advantages[r_take],
            loss_mask=self.loss_mask[r_take],
            proximal_logprobs=None if self.proximal_logprobs is None else self.proximal_logprobs[r_take],
            sample_ids=[self.sample_ids[i] for i in idx],
            policy_version=self.policy_version[idx],
            temperature=self.temperature[idx],
            source_file=[self.source_file[i] for i in idx],
            source_row=self.source_row[idx],
            global_row=None if self.global_row is None else self.global_row[idx],
            token_version=None if self.token_version is None else self.token_version[r_take],
            routed_experts=None if self.routed_experts is None else
            self.routed_experts[_gather_ranges(self.routing_offsets(), idx)[1]],
        )


def _gather_ranges(offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """New offsets and the flat element indices of the ranges of rows `idx`."""
    starts, ends = offsets[idx], offsets[idx + 1]
    lengths = ends - starts
    new_offsets = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    take = np.arange(new_offsets[-1], dtype=np.int64) - np.repeat(new_offsets[:-1] - starts, lengths)
    return new_offsets, take


# ---- loading -----------------------------------------------------------------------------------

ADV_NORMS = ("none", "std")
GROUP_STD_EPS = 1e-6  # SPEC.md §1: `--adv-norm std` divides by the group std + 1e-6


def load_rows(source: RolloutSource | str | Path | list, *, adv_norm: str = "none", temperature: float | None = None,
              shard: Shard | None = None, exchange=None) -> RolloutRows:
    """Validate `source` (a RolloutSource, or paths to open) and load every row as flat CSR arrays.

    Advantages per row, in this order: per-token `advantages`; per-sequence `advantage` broadcast
    to the row's tokens; else group-relative from `reward` + `group_id` (SPEC.md §1):
    A = R − mean_group(R), divided by the group's population std + 1e-6 when adv_norm="std".
    Temperature per row: `temperature` column, else file metadata `drpo.temperature`, else the
    `temperature` argument, else 1.0. Raises InputError listing every problem.

    Under torchrun, `shard` loads only this rank's rows and `exchange` (an all-gather of one object
    per rank) makes the validation and the group statistics global: a group may span ranks.
    """
    if adv_norm not in ADV_NORMS:
        raise ConfigError(f"--adv-norm {adv_norm!r}: expected one of {', '.join(ADV_NORMS)}")
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"--temperature {temperature}: expected a finite number > 0")
    if not isinstance(source, RolloutSource):
        source = open_rollouts(source)
    problems = validate_rollouts(source, limit=50, shard=shard, exchange=exchange)
    if problems.total:
        raise InputError(f"invalid rollouts: {problems.summary()}; first: {problems[0]}",
                         details=[str(p) for p in problems[1:]]
                         + ([f"... and {problems.total - len(problems)} more"] if problems.total > len(problems) else []))
    with_proximal = [("proximal_logprobs" in f.fields) for f in source.files]
    if any(with_proximal) and not all(with_proximal):
        missing = next(f.path for f, has in zip(source.files, with_proximal) if not has)
        raise InputError(f"{missing}: column 'proximal_logprobs' is missing but other files have it; "
                         "give it in every file or in none")
    default_temp = {f.path: file_temperature(f.metadata, temperature) for f in source.files}

    return _assemble(source.iter_batches(shard=shard), default_temp, proximal=any(with_proximal),
                     group_advantages=lambda reward, group_id, use: group_relative_advantages(
                         reward, group_id, use, adv_norm, exchange=exchange),
                     always_group=exchange is not None)


def rows_of_batch(sb: SourceBatch, default_temperature: float, group_means: pa.Table | None) -> RolloutRows:
    """One validated record batch as RolloutRows, streamed (model-mode inspect): group-relative
    advantages A = R − mean_group(R) come from `group_means` (group_advantage_table of the whole source)."""
    def lookup(reward: np.ndarray, group_id: pa.ChunkedArray, use: np.ndarray) -> np.ndarray:
        at = pc.index_in(group_id.combine_chunks(), value_set=group_means.column("group_id")).to_numpy(
            zero_copy_only=False)  # (n,) null where unused
        mean = np.where(use, group_means.column("reward_mean").to_numpy()[np.where(use, at, 0).astype(np.int64)], 0.0)
        return np.where(use, reward - mean, 0.0)

    return _assemble([sb], {sb.path: default_temperature}, proximal="proximal_logprobs" in sb.batch.schema.names,
                     group_advantages=lookup)


def _assemble(batches, default_temp: dict[str, float], *, proximal: bool, group_advantages,
              always_group: bool = False) -> RolloutRows:
    """Canonical record batches as one RolloutRows; `group_advantages(reward, group_id, use)` gives
    the (N,) row advantages of reward-based rows (called whenever there is one, or `always_group`)."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (
        "prompt_ids", "prompt_len", "response_ids", "response_len", "behavior_logprobs", "advantages",
        "loss_mask", "proximal_logprobs", "policy_version", "temperature", "source_row", "global_row",
        "from_reward", "reward", "token_version", "routed_experts")}
    sample_ids: list[str] = []
    source_file: list[str] = []
    group_ids: list[pa.Array] = []
    per_token = False  # some batch has token_policy_versions
    for sb in batches:
        b, n = sb.batch, sb.batch.num_rows
        has = set(b.schema.names)
        prompt, p_len = _flat(b.column("prompt_ids"))
        response, r_len = _flat(b.column("response_ids"))
        cols["prompt_ids"].append(prompt)
        cols["prompt_len"].append(p_len)
        cols["response_ids"].append(response)
        cols["response_len"].append(r_len)
        cols["behavior_logprobs"].append(_flat(b.column("behavior_logprobs"))[0])
        cols["loss_mask"].append(_flat(b.column("loss_mask"))[0] if "loss_mask" in has
                                 else np.ones(len(response), dtype=bool))
        if "proximal_logprobs" in has:
            cols["proximal_logprobs"].append(_flat(b.column("proximal_logprobs"))[0])
        # Advantage source, per file (validation guaranteed one exists).
        from_reward = "advantages" not in has and "advantage" not in has
        if "advantages" in has:
            adv = _flat(b.column("advantages"))[0]
        elif "advantage" in has:
            adv = np.repeat(_np(b.column("advantage")).astype(np.float32), r_len)
        else:
            adv = np.zeros(len(response), dtype=np.float32)  # filled in once group means are known
        cols["advantages"].append(adv)
        cols["from_reward"].append(np.full(n, from_reward))
        cols["reward"].append(_np(b.column("reward")).astype(np.float64) if from_reward else np.zeros(n))
        group_ids.append(b.column("group_id") if from_reward else pa.nulls(n, pa.string()))
        cols["policy_version"].append(_np(b.column("policy_version")) if "policy_version" in has
                                      else np.full(n, -1, dtype=np.int64))
        cols["token_version"].append(_flat(b.column("token_policy_versions"))[0] if "token_policy_versions" in has
                                     else np.repeat(cols["policy_version"][-1], r_len))
        per_token |= "token_policy_versions" in has
        cols["temperature"].append(_np(b.column("temperature")).astype(np.float32) if "temperature" in has
                                   else np.full(n, default_temp[sb.path], dtype=np.float32))
        cols["source_row"].append(np.arange(sb.row_offset, sb.row_offset + n, dtype=np.int64))
        cols["global_row"].append(np.arange(sb.global_offset, sb.global_offset + n, dtype=np.int64))
        cols["routed_experts"].append((sb.path, _routing(b.column("routed_experts"))
                                       if "routed_experts" in has else None))
        sample_ids.extend(b.column("sample_id").to_pylist() if "sample_id" in has
                          else [str(sb.global_offset + i) for i in range(n)])
        source_file.extend([sb.path] * n)

    routing = _cat_routing(cols.pop("routed_experts"))
    cat = {k: _cat(v, k) for k, v in cols.items()}
    r_off = _offsets(cat["response_len"])
    advantages = cat["advantages"]
    if always_group or cat["from_reward"].any():  # always under torchrun: a collective, on every rank
        row_adv = group_advantages(cat["reward"], pa.chunked_array(group_ids, pa.string()), cat["from_reward"])
        token_row = np.repeat(np.arange(len(r_off) - 1), cat["response_len"])  # (T,)
        advantages = np.where(cat["from_reward"][token_row], row_adv[token_row], advantages).astype(np.float32)
    return RolloutRows(
        prompt_ids=cat["prompt_ids"],
        prompt_offsets=_offsets(cat["prompt_len"]),
        response_ids=cat["response_ids"],
        response_offsets=r_off,
        behavior_logprobs=cat["behavior_logprobs"],
        advantages=advantages,
        loss_mask=cat["loss_mask"],
        proximal_logprobs=cat["proximal_logprobs"] if proximal else None,
        sample_ids=sample_ids,
        policy_version=cat["policy_version"],
        temperature=cat["temperature"],
        source_file=source_file,
        source_row=cat["source_row"],
        global_row=cat["global_row"],
        token_version=cat["token_version"] if per_token else None,
        routed_experts=routing,
    )


def group_relative_advantages(reward: np.ndarray, group_id: pa.ChunkedArray, use: np.ndarray,
                              adv_norm: str = "none", *, exchange=None) -> np.ndarray:
    """(N,) A = R − mean_group(R) over the rows where `use` is set (0 elsewhere); SPEC.md §1.

    adv_norm="std" divides by the group's population std + 1e-6 (GRPO, arXiv 2402.03300 §4.1.2).
    A group whose rewards are all equal gets A = 0 and so no gradient. With `exchange` (an
    all-gather under torchrun, every rank calls it) the group sums are over every rank's rows.
    """
    idx = np.flatnonzero(use)
    encoded = group_id.take(pa.array(idx)).combine_chunks().dictionary_encode()
    codes = _np(encoded.indices).astype(np.int64)
    r = reward[idx]  # (M,)
    groups = len(encoded.dictionary)

    def global_sums(*local: np.ndarray) -> list[np.ndarray]:
        """Per-group sums (G,) of this rank's rows, summed over every rank's rows of the same group id."""
        if exchange is None:
            return list(local)
        names = encoded.dictionary.to_pylist()
        total: dict = {}
        for share_names, share_sums in exchange((names, [x.tolist() for x in local])):
            for j, name in enumerate(share_names):
                acc = total.setdefault(name, [0.0] * len(local))
                for k, x in enumerate(share_sums):
                    acc[k] += x[j]
        return [np.array([total[name][k] for name in names], dtype=np.float64) for k in range(len(local))]

    count, sums = global_sums(np.bincount(codes, minlength=groups).astype(np.float64),
                              np.bincount(codes, weights=r, minlength=groups))  # (G,), (G,)
    mean = sums / np.maximum(count, 1)
    centred = r - mean[codes]
    out = np.zeros(len(reward), dtype=np.float64)
    if adv_norm == "std":
        (sq,) = global_sums(np.bincount(codes, weights=centred**2, minlength=groups))
        std = np.sqrt(sq / np.maximum(count, 1))  # (G,) population std
        centred = centred / (std[codes] + GROUP_STD_EPS)
    out[idx] = centred
    return out


def group_advantage_table(source: RolloutSource | str | Path | list) -> pa.Table:
    """Per-group reward statistics in one streaming pass over only `reward` and `group_id`.

    Returns a table (group_id, count, reward_mean, reward_std) with the population std, one row
    per group, in order of first appearance. Memory is O(number of groups).
    """
    if not isinstance(source, RolloutSource):
        source = open_rollouts(source)
    partials = []
    for sb in source.iter_batches(columns=("reward", "group_id")):
        b = sb.batch
        if "reward" not in b.schema.names or "group_id" not in b.schema.names:
            continue
        r = pc.cast(b.column("reward"), pa.float64())
        t = pa.table({"group_id": b.column("group_id"), "r": r, "r2": pc.multiply(r, r)})
        partials.append(t.group_by("group_id", use_threads=False).aggregate(
            [("r", "count"), ("r", "sum"), ("r2", "sum")]))
    if not partials:
        return pa.table({"group_id": pa.array([], pa.string()), "count": pa.array([], pa.int64()),
                         "reward_mean": pa.array([], pa.float64()), "reward_std": pa.array([], pa.float64())})
    total = pa.concat_tables(partials).group_by("group_id", use_threads=False).aggregate(
        [("r_count", "sum"), ("r_sum", "sum"), ("r2_sum", "sum")])
    n = _np(total.column("r_count_sum")).astype(np.float64)
    mean = _np(total.column("r_sum_sum")) / n
    var = np.maximum(_np(total.column("r2_sum_sum")) / n - mean**2, 0.0)  # E[R^2] - E[R]^2, clipped
    return pa.table({"group_id": total.column("group_id"), "count": n.astype(np.int64),
                     "reward_mean": mean, "reward_std": np.sqrt(var)})


def file_temperature(metadata: dict[str, str], fallback: float | None) -> float:
    """A file's default sampling temperature: drpo.temperature metadata, else `fallback`, else 1.0."""
    if "drpo.temperature" in metadata:
        return float(metadata["drpo.temperature"])  # validated as finite > 0
    return 1.0 if fallback is None else float(fallback)


def _np(arr) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


def _flat(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, lengths) of a list column."""
    return _np(arr.flatten()), _np(arr.value_lengths()).astype(np.int64)


def _routing(arr: pa.Array) -> np.ndarray:
    """(S, n_layers, k) int16 of one validated batch's routed_experts; −1 at positions not logged."""
    layers = arr.flatten()
    n_layers = _np(layers.value_lengths()).astype(np.int64)  # (S,) 0 or L
    sets = layers.flatten()
    ids = _np(sets.flatten()).astype(np.int16)
    logged = n_layers > 0
    n_l = int(n_layers[logged][0]) if logged.any() else 0
    k = int(_np(sets.value_lengths())[0]) if len(sets) else 0
    out = np.full((len(n_layers), n_l, k), -1, dtype=np.int16)
    out[logged] = ids.reshape(-1, n_l, k)
    return out


def _cat_routing(parts: list[tuple[str, np.ndarray | None]]) -> np.ndarray | None:
    """The batches' routing as one array; InputError when only some files have it, or shapes differ."""
    have = [(path, r) for path, r in parts if r is not None and r.shape[1] > 0]
    if not any(r is not None for _, r in parts):
        return None
    missing = next((path for path, r in parts if r is None), None)
    if missing is not None:
        raise InputError(f"{missing}: column 'routed_experts' is missing but other files have it; "
                         "give it in every file or in none")
    shapes = {r.shape[1:] for _, r in have}
    if len(shapes) > 1:
        (p1, r1), (p2, r2) = have[0], next((p, r) for p, r in have if r.shape[1:] != have[0][1].shape[1:])
        raise InputError(f"{p2}: column 'routed_experts': expected {r1.shape[1]} layers × {r1.shape[2]} ids per "
                         f"position (as {p1}), found {r2.shape[1]} × {r2.shape[2]}")
    n_l, k = shapes.pop() if shapes else (0, 0)
    return np.concatenate([r if r.shape[1] else np.full((len(r), n_l, k), -1, np.int16) for _, r in parts])


def _cat(parts: list[np.ndarray], name: str) -> np.ndarray:
    if parts:
        return np.concatenate(parts)
    dtype = {"prompt_ids": np.int64, "response_ids": np.int64, "loss_mask": bool, "from_reward": bool,
             "policy_version": np.int64, "token_version": np.int64, "source_row": np.int64, "global_row": np.int64,
             "prompt_len": np.int64, "response_len": np.int64, "reward": np.float64}.get(name, np.float32)
    return np.zeros(0, dtype=dtype)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)  # (N+1,)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


@dataclass(frozen=True)
class Context:
    """The most positions a model's input may hold (checkpoint.max_positions), and where that comes from."""

    limit: int
    source: str  # e.g. "max_position_embeddings of ckpt/"


def kept_response(prompt_len: np.ndarray, response_len: np.ndarray, limit: int) -> np.ndarray:
    """(n,) response tokens a row keeps within `limit` positions: its model input is prompt + response[:-1]
    (batching.py), so at most limit − P + 1 of them; 0 when the prompt alone is longer."""
    return np.minimum(response_len, np.maximum(limit - prompt_len + 1, 0))


def context_problem(path: str, row: int, sample_id: str | None, prompt_len: int, response_len: int,
                    context: Context) -> Problem:
    """A row too long for the model, with what --truncate would do to it."""
    keep = int(kept_response(np.array(prompt_len), np.array(response_len), context.limit))
    would = (f"--truncate would keep its first {keep} response tokens" if keep
             else "its prompt alone is longer: --truncate would drop the row")
    return Problem("context", path, "response_ids", row,
                   f"at most {context.limit} input positions, prompt + response - 1 ({context.source})",
                   f"{prompt_len + response_len - 1} (prompt {prompt_len}, response {response_len}); {would}", sample_id)


TRUNCATION_COUNTS = ("rows_truncated", "rows_dropped", "tokens_dropped", "trained_tokens_dropped")


def fit_context(rows: RolloutRows, context: Context | None, *, truncate: bool,
                exchange=None) -> tuple[RolloutRows, dict | None]:
    """(rows within the model's context, the reports' `truncation` counts, None without --truncate).

    Without `truncate` a row whose input (prompt + response − 1 positions) exceeds the limit is an
    InputError naming the first one in file order (over every rank's rows with `exchange`, an
    all-gather under torchrun). With it each such row keeps its first limit − P + 1 response tokens
    (their log-probs are exactly those of the whole row: a causal model's position t sees only the
    tokens up to t), the rest leave training, and a row whose prompt alone is longer is dropped.
    Counts: rows truncated (some tokens kept), rows dropped, response tokens and trained tokens dropped.
    """
    if context is None:
        return rows, None
    keep = kept_response(rows.prompt_lengths(), rows.response_lengths(), context.limit)  # (N,)
    over = np.flatnonzero(keep < rows.response_lengths())
    if not truncate:
        first = None
        if over.size:
            i = int(over[0])
            first = (int(rows.global_row[i]) if rows.global_row is not None else i, str(context_problem(
                rows.source_file[i], int(rows.source_row[i]), rows.sample_ids[i], int(rows.prompt_lengths()[i]),
                int(rows.response_lengths()[i]), context)))
        found = [f for f in ([first] if exchange is None else exchange(first)) if f is not None]
        if found:
            raise InputError(min(found)[1])
        return rows, None
    token_keep = rows.token_position() < keep[rows.token_row()]  # (T,)
    local = [int(((keep > 0) & (keep < rows.response_lengths())).sum()), int((keep == 0).sum()),
             int((~token_keep).sum()), int((rows.loss_mask & ~token_keep).sum()), int((keep > 0).sum())]
    *counts, kept = local if exchange is None else [sum(x) for x in zip(*exchange(local))]
    if kept == 0 and counts[1]:
        raise InputError(f"--truncate: the prompt of every one of the {counts[1]} rows is longer than the model's "
                         f"context ({context.limit} positions, {context.source}); nothing is left")
    if over.size:
        rows = _keep_tokens(rows, keep, token_keep)
        if (keep == 0).any():
            rows = rows.select(np.flatnonzero(keep > 0))
    return rows, {"max_positions": context.limit, **dict(zip(TRUNCATION_COUNTS, counts))}


def _keep_tokens(rows: RolloutRows, keep: np.ndarray, token_keep: np.ndarray) -> RolloutRows:
    """`rows` with only the response tokens `token_keep` (T,): each row's first keep (N,) ones."""
    routed = rows.routed_experts
    if routed is not None:  # positions: prompt + kept response − 1 per row (all but the last input token)
        per_row = rows.prompt_lengths() + keep - 1  # (N,)
        off = rows.routing_offsets()
        position = np.arange(len(routed)) - np.repeat(off[:-1], np.diff(off))
        routed = routed[position < np.repeat(per_row, np.diff(off))]
    def cut(x):
        return None if x is None else x[token_keep]
    return dataclasses.replace(
        rows, response_ids=rows.response_ids[token_keep], response_offsets=_offsets(keep),
        behavior_logprobs=rows.behavior_logprobs[token_keep], advantages=rows.advantages[token_keep],
        loss_mask=rows.loss_mask[token_keep], proximal_logprobs=cut(rows.proximal_logprobs),
        token_version=cut(rows.token_version), routed_experts=routed)


def check_vocabulary(rows: RolloutRows, vocab_size: int, model_dir: str) -> None:
    """InputError naming the first row whose prompt or response holds an id outside [0, V)."""
    for column, ids, offsets in (("prompt_ids", rows.prompt_ids, rows.prompt_offsets),
                                 ("response_ids", rows.response_ids, rows.response_offsets)):
        bad = np.flatnonzero((ids >= vocab_size) | (ids < 0))
        if bad.size:
            r = int(np.searchsorted(offsets, bad[0], "right") - 1)
            raise InputError(str(Problem(
                "vocabulary", rows.source_file[r], column, int(rows.source_row[r]),
                f"token ids in [0, {vocab_size}) (the vocabulary of {model_dir})",
                f"{int(ids[bad[0]])} at token {int(bad[0] - offsets[r])}", rows.sample_ids[r])))


def current_version(given: int | None, checkpoint_version: int | None,
                    policy_version: np.ndarray) -> tuple[int | None, str]:
    """The policy version lags count from: `given`, else the checkpoint's, else the data's newest."""
    if given is not None:
        return given, "--current-version"
    if checkpoint_version is not None:
        return checkpoint_version, "checkpoint"
    known = policy_version[policy_version >= 0]
    return (int(known.max()), "data-max") if known.size else (None, "unknown")


def too_stale(version: np.ndarray, current: int | None, *, max_lag: int | None,
              min_version: int | None) -> np.ndarray:
    """Elementwise bool: versions --max-lag N (lag = current − version > N) or --min-version V (version < V)
    leave out. Unknown versions (−1) never are; nor is any version for --max-lag when no current version is known.
    """
    # lag > N  <=>  version < current − N: one threshold below which known versions are too stale.
    bounds = ([current - max_lag] if max_lag is not None and current is not None else []) + \
        ([min_version] if min_version is not None else [])
    if not bounds:
        return np.zeros(version.shape, dtype=bool)
    return (version >= 0) & (version < max(bounds))


def version_range(token_version: np.ndarray, trained: np.ndarray, offsets: np.ndarray,
                  fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(oldest (n,), newest (n,)) version among each row's trained tokens; a row without a trained
    token gets `fallback` (its policy_version) for both. A row's lag is that of its oldest token.

    token_version (T,) int64, trained (T,) bool, offsets (n+1,) of the rows' tokens, fallback (n,).
    """
    has = _row_counts(trained, offsets) > 0  # (n,) rows with a trained token
    oldest, newest = fallback.astype(np.int64), fallback.astype(np.int64)  # copies
    if has.any():
        # A segment of reduceat runs to the next start given: over rows without a trained token, whose
        # entries are all the neutral value, so each result is exactly its row's.
        starts = offsets[:-1][has]
        every = bool(trained.all())  # then no neutral fill is needed
        oldest[has] = np.minimum.reduceat(
            token_version if every else np.where(trained, token_version, np.iinfo(np.int64).max), starts)
        newest[has] = np.maximum.reduceat(token_version if every else np.where(trained, token_version, -1), starts)
    return oldest, newest


def _row_counts(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(n,) number of set flags (T,) bool in each row: positions of the rarer value, located by the
    offsets (a cumulative sum over T int64 costs several times more)."""
    if np.count_nonzero(flags) * 2 <= len(flags):
        return np.diff(np.searchsorted(np.flatnonzero(flags), offsets))
    return np.diff(offsets) - np.diff(np.searchsorted(np.flatnonzero(~flags), offsets))


def stale_tokens(token_version: np.ndarray, loss_mask: np.ndarray, newest: np.ndarray, current: int | None, *,
                 max_lag: int | None, min_version: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(rows dropped (n,), trained tokens masked (T,)) by --max-lag / --min-version (SPEC.md §1).

    A trained token whose version is too stale leaves the loss mask; a row drops when no trained
    token is left, i.e. its newest trained token (`newest`, of version_range) is too stale, or when
    it has none and its policy_version is. Without token_policy_versions every token has the row's
    version: all of a row's tokens go, or none.
    """
    masked = loss_mask & too_stale(token_version, current, max_lag=max_lag, min_version=min_version)  # (T,)
    return too_stale(newest, current, max_lag=max_lag, min_version=min_version), masked


def staleness_counts(drop: np.ndarray, masked: np.ndarray, loss_mask: np.ndarray, offsets: np.ndarray) -> list[int]:
    """[rows dropped, their trained tokens, trained tokens masked in kept rows, rows kept] of a share of rows
    (`masked` (T,), or empty for none)."""
    trained = _row_counts(loss_mask, offsets)  # (n,)
    masked_rows = _row_counts(masked, offsets) if masked.any() else np.zeros_like(trained)  # (n,)
    return [int(drop.sum()), int(trained[drop].sum()), int(masked_rows[~drop].sum()), int((~drop).sum())]


def staleness_report(max_lag: int | None, min_version: int | None, current: int | None, counts: list[int]) -> dict:
    """The reports' `staleness_filter` (inspect's data section, train's `filters.staleness`) from the summed counts.

    Raises InputError when every row is dropped (nothing left to train or audit)."""
    rows_dropped, tokens_dropped, tokens_masked, rows_kept, without = counts
    if rows_kept == 0 and rows_dropped:
        raise InputError(f"--max-lag {max_lag} / --min-version {min_version}: every one of the {rows_dropped} rows is "
                         f"too stale (current version {current}); nothing is left")
    return {"max_lag": max_lag, "min_version": min_version, "current_version": current,
            "rows_dropped": rows_dropped, "tokens_dropped": tokens_dropped, "tokens_masked": tokens_masked,
            "rows_kept": rows_kept, "rows_without_version": without}


def staleness_filter(rows: RolloutRows, current: int | None, *, max_lag: int | None,
                     min_version: int | None, exchange=None) -> tuple[RolloutRows, dict]:
    """(rows kept, their too-stale trained tokens out of loss_mask; counts) for --max-lag / --min-version.

    With `exchange` (an all-gather under torchrun) the counts are over every rank's rows.
    Raises InputError when every row would be dropped (nothing left to train or audit).
    """
    oldest, newest = rows.version_range()  # (N,), (N,)
    drop, masked = stale_tokens(rows.token_versions(), rows.loss_mask, newest, current, max_lag=max_lag,
                                min_version=min_version)
    local = staleness_counts(drop, masked, rows.loss_mask, rows.response_offsets) + [int((oldest < 0).sum())]
    counts = staleness_report(max_lag, min_version, current,
                              local if exchange is None else [sum(x) for x in zip(*exchange(local))])
    if masked.any():
        rows = dataclasses.replace(rows, loss_mask=rows.loss_mask & ~masked)
    return (rows if not drop.any() else rows.select(np.flatnonzero(~drop))), counts
