"""Running drpo under torchrun on CPU (gloo), and the tests' one pattern: N ranks give the one-process result.

`ranks_like_one` runs the same command under torchrun and in this process (the reference); the tests then
compare the two outputs (weights with conftest.assert_trained_alike, reports with assert_same_json).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from conftest import EPS32, METRIC_ULPS, assert_reordered
from typer.testing import CliRunner

from drpo_cli.cli import app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, env: dict | None = None, script: Path | None = None
             ) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc-per-node NPROC` of `drpo ARGS` (or of `script ARGS`)."""
    target = [str(script)] if script is not None else ["-m", "drpo_cli"]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", *target, *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def one_process(*args: str):
    """The same command in this process (no process group): the reference."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    return result


def ranks_like_one(tmp_path: Path, command: str, *args: str, nproc: int = 2,
                   per_token: bool = False) -> subprocess.CompletedProcess:
    """`drpo COMMAND ARGS` under torchrun with `nproc` ranks, then in this process, asserting both succeed.

    Each writes its own output in tmp_path: train's --out ranks/ and one/, inspect's --json ranks.json and
    one.json (and with `per_token`, --per-token ranks.arrow and one.arrow). Returns the torchrun run.
    """
    def outputs(name: str) -> list[str]:
        if command == "train":
            return ["--out", str(tmp_path / name)]
        extra = ["--per-token", str(tmp_path / f"{name}.arrow")] if per_token else []
        return ["--json", str(tmp_path / f"{name}.json"), *extra]

    run = torchrun(command, *args, *outputs("ranks"), nproc=nproc)
    assert run.returncode == 0, run.stderr[-3000:]
    one_process(command, *args, *outputs("one"))
    return run


# ---- comparing the outputs ------------------------------------------------------------------------

# Execution details that legitimately depend on how rows were grouped into passes.
RUN_DETAILS = {"seconds", "micro_batches", "padding_frac", "device"}


def assert_same_json(a, b, path: str = "") -> None:
    """Equal structure; floats within METRIC_ULPS (conftest) of max(1, |value|); RUN_DETAILS keys skipped.

    The reports' floats come from log-probs that the ranks (or the streamed batches) compute on other
    micro-batches: equal to float32 rounding, not bit for bit. After an optimizer step the weights differ
    too (ADAM_DRIFT), which on these runs moves the metrics by no more (measured: 25 after 2 steps).
    """
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        ranked = next((k for k in RANKED if k in a), None)
        for k in a:
            if k == ranked:
                assert_same_ranking(a, b, ranked, path)
            elif k not in RUN_DETAILS and not (ranked and k == "worst_tokens"):
                assert_same_json(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_json(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        # worst_tokens' Δ (|Δ| ≤ 1) are rounded to 5 decimals (histograms.py): noise can move them one step
        step = 1e-5 / EPS32 if ".worst_tokens" in path else 0.0
        assert_reordered(a, b, METRIC_ULPS + step, scale=max(1.0, abs(a), abs(b)), msg=path)
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


# Lists of sequences ranked by these keys (worst first), each with its entry of "worst_tokens" beside it.
RANKED = {"worst_sequences": ("harmful_frac", "delta_abs_max"),  # inspect
          "worst_samples": ("harmful_frac", "outside_frac", "delta_abs_max")}  # train's closing audit


def assert_same_ranking(a: dict, b: dict, ranked: str, path: str) -> None:
    """Position by position the ranking keys agree (assert_same_json's bound), and so does the entry, unless
    it is another sequence: two sequences that tie in exact arithmetic (a shared prompt and first tokens give
    the same max |Δ|) are ordered by the rounding of their keys, which other batches change."""
    keys = RANKED[ranked]
    assert len(a[ranked]) == len(b[ranked]) == len(a.get("worst_tokens", a[ranked])), f"{path}.{ranked}"
    for i, (x, y) in enumerate(zip(a[ranked], b[ranked])):
        where = f"{path}.{ranked}[{i}]"
        for key in keys:
            assert_same_json(x[key], y[key], f"{where}.{key}")
        if x["sample_id"] == y["sample_id"]:
            assert_same_json(x, y, where)
            if "worst_tokens" in a:
                assert_same_json(a["worst_tokens"][i], b["worst_tokens"][i], f"{path}.worst_tokens[{i}]")


def without_per_batch_whatifs(doc: dict) -> dict:
    """An inspect report without the clip-cov / kl-cov / M2PO what-ifs, which select over each audited batch
    (SPEC.md §1): the only metrics allowed to differ when the batches differ. They must be there."""
    from drpo_cli.objectives.divergence import PER_UPDATE_METRICS

    assert all(doc["metrics"].pop(m) is not None for m in PER_UPDATE_METRICS)
    doc["metrics"].pop("m2po/dropped_pos_adv_frac")  # of what M2PO drops over each audited batch
    for entry in doc["model"]["losses"]:
        if entry["loss"] in ("clip-cov", "kl-cov", "m2po (filter)"):
            entry.pop("fractions")
    return doc
