"""`drpo inspect A --against B`: two samplers' log-probs of the same tokens, side by side (SPEC.md §2).

B's rows are matched to A's by `sample_id`; before any work both files are read once for their ids and a
64-bit hash of each row's prompt and response token ids, and a row of either file without its match, an
id given twice, or a matched row whose tokens differ is refused with its ids. Then, while A streams
record batch by record batch (in the data audit's pass, or the model pass with `--model`), the matched
B rows are read with a cursor over B's batches (one pass when both files list the rows in the same
order; B is read again from its start for a row behind the cursor) and each comparison feeds its own
`Diagnostics`: "B vs A" (π := B's log-probs, μ := A's), and with `--model` "model vs A" and "model vs B".
Memory: the id maps (O(rows)) and one batch of each file.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from drpo_cli.base.errors import InputError
from drpo_cli.config import LOSS_HPARAMS, InspectConfig
from drpo_cli.objectives.divergence import Diagnostics
from drpo_cli.rollouts.files import RolloutSource, open_rollouts
from drpo_cli.rollouts.rows import RolloutRows, file_temperature

_HASH_COLUMNS = ("sample_id", "prompt_ids", "response_ids")
_B_COLUMNS = ("response_ids", "behavior_logprobs", "loss_mask", "temperature")
_PRIME = np.uint64(1099511628211)  # FNV-64's prime: multiplications wrap modulo 2⁶⁴
EXAMPLES = 5  # ids named in a refusal


def _row_hashes(batch: pa.RecordBatch) -> np.ndarray:
    """(n,) uint64 hash of each row's prompt and response token ids (a polynomial in the ids, modulo 2⁶⁴)."""
    out = np.zeros(batch.num_rows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for name, salt in (("prompt_ids", 1), ("response_ids", 2)):
            col = batch.column(name)
            off = col.offsets.to_numpy().astype(np.int64)
            ids = col.values.slice(int(off[0]), int(off[-1] - off[0])).to_numpy(zero_copy_only=False)
            off = off - off[0]
            lengths = np.diff(off)
            pos = np.arange(len(ids), dtype=np.int64) - np.repeat(off[:-1], lengths)  # (T,) position in its row
            powers = np.cumprod(np.full(int(lengths.max(initial=0)) + 1, _PRIME, dtype=np.uint64))
            terms = (ids.astype(np.uint64) + np.uint64(salt)) * powers[pos]  # (T,)
            sums = np.zeros(len(terms) + 1, dtype=np.uint64)
            np.cumsum(terms, out=sums[1:])
            out = out * _PRIME + (sums[off[1:]] - sums[off[:-1]]) + lengths.astype(np.uint64)
    return out


def _ids_and_hashes(source: RolloutSource, role: str) -> tuple[list, list[str], np.ndarray]:
    """(sample ids in file order, where each row is ("FILE row K"), their row hashes); InputError when a file has
    no sample_id."""
    ids, where, hashes = [], [], []
    for rf in source.files:
        if "sample_id" not in rf.fields:
            raise InputError(f"{rf.path}: column sample_id: expected sample ids to match the rows of {role} "
                             "(--against), found no such column")
    for sb in source.iter_batches(_HASH_COLUMNS):
        ids += sb.batch.column("sample_id").to_pylist()
        where += [f"{sb.path} row {sb.row_offset + k}" for k in range(sb.batch.num_rows)]
        hashes.append(_row_hashes(sb.batch))
    return ids, where, np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)


def _refuse(what: str, expected: str, found: str, rows: list[tuple[object, str]]) -> None:
    """InputError naming the first EXAMPLES (sample id, "FILE row K") of `rows`."""
    shown = ", ".join(f"{sid!r} ({at})" for sid, at in rows[:EXAMPLES])
    more = f" and {len(rows) - EXAMPLES} more" if len(rows) > EXAMPLES else ""
    raise InputError(f"{what}: expected {expected}, found {len(rows)} {found}: sample_id {shown}{more}")


class Against:
    """B's rows matched to A's: `b_row[a_global_row]`, and a reader of B's log-probs for A's streamed rows."""

    def __init__(self, source_a: RolloutSource, cfg: InspectConfig):
        self.files = list(cfg.against)
        self.source = open_rollouts(self.files, cfg.column_map())
        a_path, b_path = ", ".join(cfg.rollouts), ", ".join(self.files)
        ids_a, where_a, hash_a = _ids_and_hashes(source_a, "--against")
        ids_b, where_b, hash_b = _ids_and_hashes(self.source, "the audited rollouts")
        for path, ids, where in ((a_path, ids_a, where_a), (b_path, ids_b, where_b)):
            seen: set = set()
            twice = [(i, at) for i, at in zip(ids, where) if i in seen or seen.add(i)]
            if twice:
                _refuse(f"{path}: column sample_id", "each sample id once (rows are matched by it)",
                        "repeated", twice)
        row_of_b = {sid: k for k, sid in enumerate(ids_b)}
        missing = [(sid, at) for sid, at in zip(ids_a, where_a) if sid not in row_of_b]
        if missing:
            _refuse(f"{b_path}: column sample_id", f"a row for every sample id of {a_path}", "without one", missing)
        in_a = set(ids_a)
        extra = [(sid, at) for sid, at in zip(ids_b, where_b) if sid not in in_a]
        if extra:
            _refuse(f"{b_path}: column sample_id", f"only the sample ids of {a_path}", "others", extra)
        self.b_row = np.fromiter((row_of_b[sid] for sid in ids_a), dtype=np.int64, count=len(ids_a))  # (N,)
        differ = [(ids_a[k], where_b[self.b_row[k]]) for k in np.flatnonzero(hash_a != hash_b[self.b_row])]
        if differ:
            _refuse(f"{b_path}: columns prompt_ids, response_ids", f"the token ids of the same rows of {a_path}",
                    "whose tokens differ", differ)
        self._batches, self._current = None, None
        self.default_temperature = {rf.path: file_temperature(rf.metadata, cfg.temperature) for rf in self.source.files}
        self.temperature_differs = 0  # A's rows (this rank's) whose B row has another sampling temperature

    def _restart(self) -> None:
        self._batches = self.source.iter_batches(_B_COLUMNS)
        self._current = next(self._batches, None)

    def _rows(self, wanted: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray, float]]:
        """{B global row: (log-probs (n,), loss_mask (n,), temperature)} of the sorted rows `wanted`."""
        out: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
        if self._current is None or (wanted.size and wanted[0] < self._current.global_offset):
            self._restart()
        for g in wanted.tolist():
            while self._current is not None and g >= self._current.global_offset + self._current.batch.num_rows:
                self._current = next(self._batches, None)
            if self._current is None or g < self._current.global_offset:  # behind the cursor: from the start
                self._restart()
                while g >= self._current.global_offset + self._current.batch.num_rows:
                    self._current = next(self._batches)
            b, k = self._current.batch, g - self._current.global_offset
            logp = np.asarray(b.column("behavior_logprobs")[k].values.to_numpy(zero_copy_only=False), np.float32)
            mask = (np.asarray(b.column("loss_mask")[k].values.to_numpy(zero_copy_only=False), bool)
                    if "loss_mask" in b.schema.names else np.ones(len(logp), dtype=bool))
            temperature = b.column("temperature")[k].as_py() if "temperature" in b.schema.names else None
            out[g] = (logp, mask, self.default_temperature[self._current.path] if temperature is None else temperature)
        return out

    def behavior_of(self, rows: RolloutRows) -> tuple[np.ndarray, np.ndarray]:
        """(B's log-probs (T,), B's loss_mask (T,)) laid out as A's streamed `rows`' tokens (a row --truncate cut
        keeps B's first tokens as A's); counts the rows whose sampling temperature differs between the files
        (their log-probs are of other distributions)."""
        b_rows = self.b_row[rows.global_row]  # (n,)
        found = self._rows(np.unique(b_rows))
        if rows.num_rows == 0:
            return np.zeros(0, np.float32), np.zeros(0, bool)
        lengths = rows.response_lengths()  # (n,) A's, shorter than B's where --truncate cut the row
        logp = np.concatenate([found[int(g)][0][:n] for g, n in zip(b_rows, lengths)])
        mask = np.concatenate([found[int(g)][1][:n] for g, n in zip(b_rows, lengths)])
        temperature = np.array([found[int(g)][2] for g in b_rows], dtype=np.float32)  # (n,) as A's, float32
        self.temperature_differs += int((temperature != rows.temperature).sum())
        return logp, mask


class Comparisons:
    """One Diagnostics per comparison: "B vs A" always, "model vs A" and "model vs B" with a model."""

    def __init__(self, cfg: InspectConfig, against: Against, with_model: bool):
        self.against = against
        labels = (["model vs A", "model vs B"] if with_model else []) + ["B vs A"]
        losses = {name: dict(hp) for name, hp in LOSS_HPARAMS.items()}
        losses["drpo"] = {"delta": cfg.chosen_delta()}
        self.diags = {label: Diagnostics(cfg.tr_delta, losses, catastrophic=cfg.is_veto,
                                         opsm_delta=cfg.resolved_opsm_delta(),
                                         m2po_threshold=cfg.resolved_m2po_threshold()) for label in labels}
        self.mask_differs = 0

    def update(self, rows: RolloutRows, idx: np.ndarray, mu_b: np.ndarray, mask_b: np.ndarray,
               logp: torch.Tensor | None = None, seq_index: torch.Tensor | None = None) -> None:
        """Add A's tokens `idx` of `rows` (B's `mu_b`, `mask_b` laid out as `rows`); `logp` the model's."""
        mu_a = torch.from_numpy(rows.behavior_logprobs[idx])
        mu_bt = torch.from_numpy(mu_b[idx])
        adv = torch.from_numpy(rows.advantages[idx])
        both = torch.from_numpy(rows.loss_mask[idx] & mask_b[idx])  # tokens trained in both files
        self.mask_differs += int((rows.loss_mask[idx] != mask_b[idx]).sum())
        row = torch.from_numpy(rows.global_row[rows.token_row()[idx]])
        seq = seq_index if seq_index is not None else torch.from_numpy(rows.token_row()[idx])
        pairs = {"B vs A": (mu_bt, mu_a)}
        if logp is not None:
            pairs.update({"model vs A": (logp, mu_a), "model vs B": (logp, mu_bt)})
        for label, (pi, mu) in pairs.items():
            self.diags[label].update(pi, mu, adv, both, row=row, seq_index=seq, old_logp=pi)

    def close_rows(self) -> None:
        for diag in self.diags.values():
            diag.close_rows()

    def section(self) -> dict:
        """The report's `against` section (a collective under torchrun)."""
        from drpo_cli.model import distributed

        differs, temperatures = distributed.all_reduce_sum(
            torch.tensor([self.mask_differs, self.against.temperature_differs])).tolist()
        out = []
        for label, diag in self.diags.items():
            s = diag.all_reduce_().summary()
            metrics = {k: v for k, v in s.items() if not isinstance(v, (dict, list)) and not k.startswith("data/")}
            out.append({"label": label, "pi": label.split(" vs ")[0], "mu": label.split(" vs ")[1],
                        "tokens": int(s["data/tokens"]), "metrics": metrics})
        return {"files": self.against.files, "rows": len(self.against.b_row), "mask_differs": int(differs),
                "temperature_differs": int(temperatures), "comparisons": out}


def compare_without_model(cfg: InspectConfig, source: RolloutSource, against: Against, shard=None) -> dict:
    """B vs A over every row of A (this rank's share under torchrun), streaming A batch by batch."""
    from drpo_cli.rollouts.rows import file_temperature, group_advantage_table, rows_of_batch

    reward_files = [rf for rf in source.files if "advantages" not in rf.fields and "advantage" not in rf.fields]
    groups = group_advantage_table(RolloutSource(reward_files, [], source.column_map)) if reward_files else None
    temps = {rf.path: file_temperature(rf.metadata, cfg.temperature) for rf in source.files}
    comparisons = Comparisons(cfg, against, with_model=False)
    from drpo_cli.audit.columns import MODEL_COLUMNS

    for sb in source.iter_batches(MODEL_COLUMNS, shard=shard):
        rows = rows_of_batch(sb, temps[sb.path], groups)
        mu_b, mask_b = against.behavior_of(rows)
        comparisons.update(rows, np.arange(rows.num_tokens), mu_b, mask_b)
        comparisons.close_rows()
    return comparisons.section()
