"""Scale-out (torchrun + FSDP2): N ranks give the single-process result; a failing rank stops every rank.

The multi-process tests launch `python -m torch.distributed.run --nproc-per-node 2` on CPU (gloo)
against the bundled example (examples/toy: a 2-layer Llama with tied embeddings) and compare with
a one-process run of the same command and the same global batch. The in-process tests join a
one-rank gloo group to check the FSDP entry point and the streamed save without a launcher.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
from conftest import (
    ENTROPY_ULPS,
    GRAD_ULPS,
    LOGP_ULPS,
    METRIC_ULPS,
    assert_reordered,
    assert_trained_alike,
)
from ranks import (
    assert_same_json,
    free_port,
    one_process,
    ranks_like_one,
    torchrun,
    without_per_batch_whatifs,
)
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from toy import copy_toy
from typer.testing import CliRunner

from drpo_cli.base import hooks
from drpo_cli.cli import app, without_nproc
from drpo_cli.model import distributed

ROWS = 64  # a slice of the example keeps the runs short; process start-up dominates anyway
TRAIN_ARGS = ["--quiet", "--device", "cpu", "--lr", "1e-3", "--minibatches", "2", "--micro-batch-tokens", "256",
              # clipping active (global norm ≈ 0.1): the weights then depend on the gradient's scale,
              # so a mean instead of a sum over ranks would show in the weights, not only in grad_norm
              "--max-grad-norm", "0.05"]
INSPECT_ARGS = ["--quiet", "--device", "cpu", "--micro-batch-tokens", "256"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """model/ and the first ROWS rows of rollouts.arrow (metadata kept), in a private directory."""
    return copy_toy(tmp_path_factory.mktemp("toy"), rows=ROWS)


@pytest.fixture(scope="module")
def untied(toy, tmp_path_factory) -> Path:
    """The toy model with its own output head (the embedding plus noise), next to the same rows."""
    from drpo_cli.model.checkpoint import load_model

    root = tmp_path_factory.mktemp("untied")
    tied, _ = load_model(toy / "model")
    config = tied.config
    config.tie_word_embeddings = False
    model = type(tied)(config)
    state = tied.state_dict()
    torch.manual_seed(0)
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 0.05 * torch.randn_like(state["lm_head.weight"])
    model.load_state_dict(state)
    model.save_pretrained(root / "model")
    shutil.copy(toy / "model" / "drpo_checkpoint.json", root / "model")
    shutil.copy(toy / "rollouts.arrow", root / "rollouts.arrow")
    return root


# ---- the command line, without processes --------------------------------------------------------


def test_without_nproc_drops_only_the_nproc_option():
    argv = ["--debug", "train", "-r", "x.arrow", "--nproc", "2", "--lr", "1e-3", "--nproc=4", "--quiet"]
    assert without_nproc(argv) == ["--debug", "train", "-r", "x.arrow", "--lr", "1e-3", "--quiet"]


def test_torchrun_command_line():
    argv = distributed.torchrun_argv(3, ["train", "--quiet"])
    assert argv == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
                    "-m", "drpo_cli", "train", "--quiet"]


def test_cpu_offload_needs_fsdp(toy, tmp_path):
    result = CliRunner().invoke(app, ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"),
                                      "--out", str(tmp_path / "out"), "--cpu-offload", *TRAIN_ARGS])
    assert result.exit_code == 2
    assert "--cpu-offload: needs FSDP" in result.output
    assert not (tmp_path / "out").exists()


def test_reductions_are_identities_in_one_process():
    t = torch.tensor([1.5, -2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.5, -2.0]
    assert distributed.all_reduce_max(t).tolist() == [1.5, -2.0]
    assert distributed.max_count(3) == 3
    assert distributed.gather_to_rank0("x") == ["x"]


# ---- FSDP2 in this process (one gloo rank) -------------------------------------------------------


@pytest.fixture
def one_rank_group(monkeypatch):
    """A one-rank gloo process group, as torchrun --nproc-per-node 1 would set it up."""
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    assert distributed.init(torch.device("cpu")) == torch.device("cpu")
    yield
    distributed.shutdown()
    assert not dist.is_initialized()


@pytest.mark.parametrize("which", ["toy", "untied"])
def test_sharded_engine_gives_the_plain_models_loss_and_gradients(which, request, one_rank_group):
    from torch.distributed.fsdp import FSDPModule

    from drpo_cli.model.batching import plan_micro_batches
    from drpo_cli.model.checkpoint import load_model
    from drpo_cli.model.logprobs import fused_token_loss, token_logprobs
    from drpo_cli.rollouts.rows import load_rows

    root = request.getfixturevalue(which)
    rows = load_rows([str(root / "rollouts.arrow")])
    mb = plan_micro_batches(rows, np.arange(8), 4096)[0]
    plain, _ = load_model(root / "model")
    sharded, _ = load_model(root / "model")
    distributed.shard_model(sharded, torch.device("cpu"))
    assert distributed.is_sharded(sharded) and not distributed.is_sharded(plain)
    assert len(distributed.decoder_layers(plain)) == 2
    # Untied, the embedding and the head are FSDP units of their own (never gathered together); tied, the root's.
    own_units = isinstance(sharded.lm_head, FSDPModule), isinstance(sharded.model.embed_tokens, FSDPModule)
    assert own_units == ((True, True) if which == "untied" else (False, False))

    def loss_fn(logp, sl):  # any elementwise loss: here Σ_t (t+1)·logp_t
        return (logp * torch.arange(1, mb.num_tokens + 1, dtype=torch.float32)[sl]).sum()

    results = []
    for model in (plain, sharded):
        with torch.inference_mode():
            lp_inf = token_logprobs(model, mb)[0]
        if model is sharded:  # no backward followed: the root must be resharded, or an optimizer built
            # now would hold the gathered root parameters instead of the shards
            assert all(isinstance(p, DTensor) for p in model.parameters())
        loss, logp, _ = fused_token_loss(model, mb, loss_fn)
        loss.backward()
        grads = {n: distributed.full_value(p.grad) for n, p in model.named_parameters()}
        results.append((lp_inf, loss.detach(), logp, grads))
    (lp_a, loss_a, logp_a, g_a), (lp_b, loss_b, logp_b, g_b) = results
    # The same formulas; untied, FSDP2 computes the head vocabulary-parallel (its own log-sum-exp merge and
    # gradient sums), so the results agree to rounding, not bit for bit.
    assert_reordered(lp_b, lp_a, LOGP_ULPS, scale=1 + lp_a.abs(), msg="inference log-probs")
    assert_reordered(logp_b, logp_a, LOGP_ULPS, scale=1 + logp_a.abs(), msg="log-probs")
    # The loss Σ_t (t+1)·logp_t: the per-token bound summed, and as much again for the sum's own rounding.
    weights = torch.arange(1, mb.num_tokens + 1, dtype=torch.float32)
    assert_reordered(loss_b, loss_a, LOGP_ULPS, scale=2 * (weights * (1 + logp_a.abs())).sum(), msg="loss")
    assert g_a.keys() == g_b.keys()
    # The embedding (tied: and head) receives its gradients through the entry points.
    assert g_b["model.embed_tokens.weight"].abs().sum() > 0
    if which == "untied":
        assert g_b["lm_head.weight"].abs().sum() > 0
        assert not torch.equal(g_b["lm_head.weight"], g_b["model.embed_tokens.weight"])
    for name in g_a:
        assert_reordered(g_b[name], g_a[name], GRAD_ULPS, msg=name)


def test_meta_device_sharded_load_equals_the_plain_load(toy, one_rank_group):
    from drpo_cli.model.checkpoint import load_model

    plain, plain_info = load_model(toy / "model")
    sharded, info = distributed.load_sharded_model(toy / "model", torch.device("cpu"))
    assert distributed.is_sharded(sharded) and info.vocab_size == plain_info.vocab_size
    assert sharded.lm_head.weight is sharded.model.embed_tokens.weight  # still tied, read once
    full = {n: distributed.full_value(p) for n, p in sharded.state_dict().items()}
    reference = plain.state_dict()
    assert full.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(full[name], value), name
    # Rotary frequencies are not in the checkpoint: computed, kept across to_empty, put back.
    buffers, plain_buffers = dict(sharded.named_buffers()), dict(plain.named_buffers())
    assert buffers.keys() == plain_buffers.keys() and "model.rotary_emb.inv_freq" in buffers
    for name, value in plain_buffers.items():
        assert torch.equal(buffers[name], value), name


def test_sharded_load_names_a_missing_weight(toy, one_rank_group, tmp_path):
    from safetensors.torch import save_file

    from drpo_cli.base.errors import CheckpointError

    shutil.copytree(toy / "model", tmp_path / "m")
    tensors = load_file(str(toy / "model" / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="weights missing from the checkpoint: model.norm.weight"):
        distributed.load_sharded_model(tmp_path / "m", torch.device("cpu"))


def poisoned(toy: Path, tmp_path: Path, row: int) -> Path:
    """The toy model with one NaN in gate_proj (128 rows: rank 0 of 2 holds rows 0-63, rank 1 the rest)."""
    from safetensors.torch import save_file

    shutil.copytree(toy / "model", tmp_path / "m")
    tensors = load_file(str(toy / "model" / "model.safetensors"))
    tensors["model.layers.0.mlp.gate_proj.weight"][row, 5] = float("nan")
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    return tmp_path / "m"


def test_sharded_load_refuses_a_non_finite_weight_naming_it(toy, one_rank_group, tmp_path):
    from drpo_cli.base.errors import CheckpointError

    model = poisoned(toy, tmp_path, 100)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight holds "
                                              r"nan at \[100, 5\]; drpo refuses non-finite weights"):
        distributed.load_sharded_model(model, torch.device("cpu"))


def test_streamed_save_of_a_sharded_model_equals_the_plain_save(toy, one_rank_group, tmp_path):
    from drpo_cli.model.checkpoint import load_model, save_checkpoint

    plain, _ = load_model(toy / "model")
    sharded, _ = load_model(toy / "model")
    distributed.shard_model(sharded, torch.device("cpu"))
    kw = {"source_dir": toy / "model", "policy_version": 9, "training_config": {}, "extra_files": {"r.json": "{}"}}
    save_checkpoint(plain, out_dir=tmp_path / "plain", **kw)
    distributed.save_full_checkpoint(sharded, out_dir=tmp_path / "sharded", **kw)
    a, b = load_file(str(tmp_path / "plain" / "model.safetensors")), load_file(str(tmp_path / "sharded" / "model.safetensors"))
    assert a.keys() == b.keys() and "lm_head.weight" not in b  # tied head written once
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "sharded"]  # no temporary directory left


# ---- two processes -------------------------------------------------------------------------------


@pytest.mark.multiproc
@pytest.mark.parametrize("which", ["toy", "untied"])
def test_two_ranks_train_the_same_weights_and_report_as_one(which, request, tmp_path):
    # The proximal anchor adds a sharded inference pass before training; activation checkpointing
    # re-gathers each layer in backward. Untied: the embedding and the head are units of their own
    # (its 21 vocabulary rows shard unevenly: 11 + 10).
    toy = request.getfixturevalue(which)
    common = ["-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"), *TRAIN_ARGS,
              "--anchor", "proximal", "--is-correction", "tis", "--grad-checkpointing"]
    run = ranks_like_one(tmp_path, "train", *common)
    assert run.stdout.count("wrote ") == 1  # rank 0 alone reports

    source = load_file(str(toy / "model" / "model.safetensors"))
    one, two = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "ranks" / "model.safetensors"))
    assert one.keys() == two.keys() == source.keys()
    assert max((one[k] - source[k]).abs().max().item() for k in one) > 1e-4  # the weights did move
    assert_trained_alike(one, two, lr=1e-3, steps=2)  # TRAIN_ARGS: --lr 1e-3, --minibatches 2

    r1 = json.loads((tmp_path / "one" / "drpo_report.json").read_text())
    r2 = json.loads((tmp_path / "ranks" / "drpo_report.json").read_text())
    assert [s["tokens"] for s in r1["steps"]] == [s["tokens"] for s in r2["steps"]]
    for s1, s2 in zip(r1["steps"], r2["steps"]):
        assert not s1["skipped"] and not s2["skipped"]
        # a sum over ranks, not a mean: the norm of gradients that agree within GRAD_ULPS (squares: no cancellation)
        assert_reordered(s2["grad_norm"], s1["grad_norm"], GRAD_ULPS, scale=s1["grad_norm"], msg="grad_norm")
    for section in ("steps", "final", "input", "loss", "notes"):
        assert_same_json(r1[section], r2[section], section)
    r1["config"].pop("out"), r2["config"].pop("out")
    assert r1["config"] == r2["config"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "ranks"]  # other ranks wrote nothing


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_ranks_train_gspo_with_reference_kl_entropy_rejection_and_filters_like_one(toy, tmp_path):
    # The reference model's pass and π_old's pass run sharded before training; GSPO's whole-sequence
    # upstream gradients, the KL and entropy terms and the sequence-level ρ must not depend on ranks.
    common = ["-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"), *TRAIN_ARGS, "--loss", "gspo",
              "--eps-low", "0.05", "--eps-high", "0.05", "--agg", "seq-mean-token-mean", "--anchor", "proximal",
              "--is-correction", "tis", "--is-level", "geometric", "--ref-model", str(toy / "model"),
              "--kl-coef", "0.1", "--entropy-coef", "0.01", "--reject", "seq_max_k3>0.5", "--max-lag", "2"]
    ranks_like_one(tmp_path, "train", *common)
    one, two = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "ranks" / "model.safetensors"))
    assert_trained_alike(one, two, lr=1e-3, steps=2)  # TRAIN_ARGS: --lr 1e-3, --minibatches 2
    r1 = json.loads((tmp_path / "one" / "drpo_report.json").read_text())
    r2 = json.loads((tmp_path / "ranks" / "drpo_report.json").read_text())
    assert r1["filters"]["staleness"]["rows_dropped"] > 0
    for section in ("steps", "final", "input", "loss", "filters"):
        assert_same_json(r1[section], r2[section], section)


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_ranks_train_clip_cov_with_m2po_and_opsm_like_one(toy, tmp_path):
    # Step-wide statistics: the clip-cov selection (from a sharded inference sweep at the step's weights)
    # and the M2PO mask are taken over the step's tokens of both ranks in global order, so two ranks
    # select exactly the tokens one process selects; OPSM is per sequence.
    common = ["-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"), *TRAIN_ARGS, "--loss", "clip-cov",
              "--cov-ratio", "0.05", "--cov-lb", "-1", "--m2po-threshold", "0.01", "--opsm-delta", "0.05"]
    ranks_like_one(tmp_path, "train", *common)
    one, two = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "ranks" / "model.safetensors"))
    assert_trained_alike(one, two, lr=1e-3, steps=2)  # TRAIN_ARGS: --lr 1e-3, --minibatches 2
    r1 = json.loads((tmp_path / "one" / "drpo_report.json").read_text())
    r2 = json.loads((tmp_path / "ranks" / "drpo_report.json").read_text())
    assert all(0 < s["metrics"][m] < 1 for s in r1["steps"]
               for m in ("clip_cov/selected_frac", "m2po/masked_frac", "opsm/token_drop_frac"))
    for section in ("steps", "final"):
        assert_same_json(r1[section], r2[section], section)


@pytest.mark.multiproc
def test_two_ranks_interrupted_then_resumed_reach_the_uninterrupted_weights(toy, tmp_path):
    from drpo_cli.base.hooks import INTERRUPT_AFTER_STEP as INTERRUPT_HOOK

    common = ["-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"), *TRAIN_ARGS, "--epochs", "2"]  # 4 steps
    one_process("train", *common, "--out", str(tmp_path / "straight"))
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))

    def interrupted(name: str, launcher: str) -> Path:
        if launcher == "torchrun":  # what a scheduler sees under plain torchrun: every rank 130, torchrun 1
            run = torchrun("train", *common, "--out", str(tmp_path / name), env={INTERRUPT_HOOK: "1"})
            assert run.returncode == 1
            assert "exitcode  : 130" in run.stderr, run.stderr[-3000:]  # torchrun names the ranks: 130
        else:  # `drpo train --nproc 2` reads its ranks' codes: 130
            run = subprocess.run([sys.executable, "-m", "drpo_cli", "train", "--nproc", "2", *common, "--out",
                                  str(tmp_path / name)], check=False, capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "OMP_NUM_THREADS": "1", INTERRUPT_HOOK: "1"})
            assert run.returncode == 130, run.stderr[-3000:]
        state = tmp_path / f"{name}.partial-state"
        assert run.stderr.count(f"interrupted after step 2 of 4; state saved to {state}") == 2, run.stderr[-3000:]
        assert state.is_dir() and not (tmp_path / name).exists()
        return state

    # The same world size: every rank wrote its own shards; every rank reads them back.
    interrupted("same", "drpo --nproc")
    run = torchrun("train", *common, "--out", str(tmp_path / "same"), "--resume")
    assert run.returncode == 0, run.stderr[-3000:]
    # Another world size: DCP reshards the 2-rank state for one process.
    interrupted("other", "torchrun")
    one_process("train", *common, "--out", str(tmp_path / "other"), "--resume")
    for name in ("same", "other"):
        resumed = load_file(str(tmp_path / name / "model.safetensors"))
        assert resumed.keys() == straight.keys()
        assert_trained_alike(resumed, straight, lr=1e-3, steps=4, msg=name)
        assert not (tmp_path / f"{name}.partial-state").exists()
    report = json.loads((tmp_path / "same" / "drpo_report.json").read_text())
    assert [s["step"] for s in report["steps"]] == [0, 1, 2, 3]


@pytest.mark.multiproc
def test_two_ranks_stop_inside_a_step_before_the_same_pass_and_resume_to_the_uninterrupted_weights(toy, tmp_path):
    # A signal inside step 1's first forward: every rank checks before each pass (one collective), so all
    # stop before the same one, drop the step's gradients and save the state at its start.
    from drpo_cli.base.hooks import INTERRUPT_IN_STEP

    common = ["-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"), *TRAIN_ARGS, "--epochs", "2",
              "--micro-batch-tokens", "32"]  # 4 steps of several passes per rank
    one_process("train", *common, "--out", str(tmp_path / "straight"))
    run = torchrun("train", *common, "--out", str(tmp_path / "out"), env={INTERRUPT_IN_STEP: "1"})
    state = tmp_path / "out.partial-state"
    assert "exitcode  : 130" in run.stderr, run.stderr[-3000:]
    assert run.stderr.count(f"interrupted during step 2 of 4; state saved to {state}") == 2, run.stderr[-3000:]
    assert json.loads((state / "state.json").read_text())["next_step"] == 1
    run = torchrun("train", *common, "--out", str(tmp_path / "out"), "--resume")
    assert run.returncode == 0, run.stderr[-3000:]
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert max((resumed[k] - straight[k]).abs().max().item() for k in straight) <= 1e-5


@pytest.mark.multiproc
@pytest.mark.parametrize("which", ["toy", "untied"])
def test_two_ranks_inspect_like_one(which, request, tmp_path):
    toy = request.getfixturevalue(which)
    common = [str(toy / "rollouts.arrow"), "--model", str(toy / "model"), *INSPECT_ARGS]
    ranks_like_one(tmp_path, "inspect", *common, per_token=True)

    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "ranks"))
    assert one["model"]["tokens"] == two["model"]["tokens"] > 0
    assert_same_json(without_per_batch_whatifs(one), without_per_batch_whatifs(two))  # two ranks audit other batches

    order = [("sample_id", "ascending"), ("position", "ascending")]
    t1, t2 = (pa.ipc.open_file(str(tmp_path / f"{n}.arrow")).read_all().sort_by(order) for n in ("one", "ranks"))
    assert t1.num_rows == t2.num_rows > 0  # every response token once, whichever rank computed it
    # The ranks compute log π on other micro-batches (LOGP_ULPS); each other float column is a function of it
    # (and of the logged μ, A), so its bound scales by that function's derivative, plus its own rounding.
    c = {name: t1[name].to_numpy().astype(np.float64)
         for name in ("logp", "behavior_logp", "logr", "ratio", "k3", "entropy")}
    u = 1 + np.abs(c["logp"])
    bounds = {"logp": (LOGP_ULPS, u), "logr": (LOGP_ULPS, u + np.abs(c["logr"])),
              "ratio": (LOGP_ULPS, c["ratio"] * (1 + u)),
              "delta": (LOGP_ULPS, np.exp(c["logp"]) * (1 + u) + np.exp(c["behavior_logp"])),
              "k3": (LOGP_ULPS, np.abs(c["ratio"] - 1) * u + c["k3"]), "entropy": (ENTROPY_ULPS, 1 + c["entropy"])}
    for name in t1.schema.names:
        x, y = t1[name].to_numpy(), t2[name].to_numpy()
        if name in bounds:
            assert_reordered(y, x, bounds[name][0], scale=bounds[name][1], msg=name)
        else:  # ids, the logged μ and A, and decisions (|Δ| > δ): a flip would need a Δ within rounding of δ
            assert (x == y).all(), name


@pytest.mark.multiproc
def test_two_ranks_inspect_breakdowns_and_peer_metrics_like_one(toy, tmp_path):
    # --by tables merge by value, sequence-level sums by row, the worst sequences by --worst-by across ranks.
    common = [str(toy / "rollouts.arrow"), "--model", str(toy / "model"), *INSPECT_ARGS, "--by", "group_id",
              "--by", "policy_version", "--worst-by", "chi2/seq", "--is-veto", "0.05", "--reject", "seq_max_k1>0.5"]
    ranks_like_one(tmp_path, "inspect", *common)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "ranks"))
    assert one["model"]["by"]["group_id"] and one["data"]["by"]["policy_version"]
    assert_same_json(without_per_batch_whatifs(one), without_per_batch_whatifs(two))


def test_launched_means_started_by_torchrun_with_any_number_of_processes(monkeypatch):
    from drpo_cli.base import launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "0")
    assert not launch.launched() and launch.leads()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch.launched() and launch.launched_rank() == 0 and launch.leads()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert launch.launched() and not launch.leads()


@pytest.mark.multiproc
def test_one_process_under_torchrun_inspects_like_a_plain_process(toy, tmp_path):
    # torchrun with one process: inspect joins a process group and splits the rows (one share) as train
    # does; the report is the plain process's.
    common = [str(toy / "rollouts.arrow"), "--model", str(toy / "model"), *INSPECT_ARGS]
    ranks_like_one(tmp_path, "inspect", *common, nproc=1)
    assert_same_json(*(json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "ranks")))


def test_the_launchers_exit_code_is_130_when_the_ranks_saved_their_state_and_4_when_not(tmp_path):
    from drpo_cli.base.launch import launcher_exit_code

    def code(torchrun_code: int, ranks: list[int]) -> int:
        where = tmp_path / f"{torchrun_code}-{'-'.join(map(str, ranks))}"
        where.mkdir()
        for r, c in enumerate(ranks):
            (where / f"rank{r}").write_text(str(c))
        return launcher_exit_code(torchrun_code, where)

    assert code(1, [130, 130]) == 130
    assert code(1, [0, 130]) == 130  # a rank that had finished
    assert code(1, [130, 1]) == 1  # a failure is a failure
    assert code(1, []) == 1  # ranks that never reported (killed): torchrun's code
    assert code(0, [0, 0]) == 0
    assert code(2, [2, 2]) == 2
    assert code(1, [4, 4]) == 4  # interrupted with nothing kept: no --resume
    assert code(1, [130, 4]) == 4  # a rank without its state: the run cannot resume
    assert code(1, [4, 1]) == 1


@pytest.mark.multiproc
def test_sigterm_to_drpo_train_nproc_reaches_every_rank_once_and_exits_130(toy, tmp_path):
    import signal
    import time

    out, board = tmp_path / "out", tmp_path / "tb"
    command = [sys.executable, "-m", "drpo_cli", "train", "--nproc", "2", "-r", str(toy / "rollouts.arrow"),
               "-m", str(toy / "model"), "--out", str(out), *TRAIN_ARGS, "--epochs", "500", "--tensorboard", str(board)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        # The events file appears after both ranks joined the process group: their handlers are in place.
        while not (board.is_dir() and any(board.iterdir())) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 2 and all("state saved to" in line and "--resume" in line for line in lines), err[-3000:]
    assert Path(f"{out}.partial-state").is_dir() and not out.exists()


@pytest.mark.multiproc
def test_a_failing_rank_stops_every_rank_and_writes_nothing(toy, tmp_path):
    # Through `drpo train --nproc 2`, which relaunches the same command under torchrun.
    command = [sys.executable, "-m", "drpo_cli", "train", "--nproc", "2", "-r", str(toy / "rollouts.arrow"),
               "-m", str(toy / "model"), "--out", str(tmp_path / "out"), *TRAIN_ARGS]
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", hooks.FAIL_RANK: "1"})
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    injected = "RuntimeError: failure injected by DRPO_TEST_FAIL_RANK=1 during save"
    assert sorted(errors) == [
        f"error: [rank 0] saving the checkpoint stopped: rank 1 of 2 failed: {injected}",
        f"error: [rank 1] {injected} (run with --debug for the traceback)",
    ], run.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # no output directory, no temporary sibling


@pytest.mark.multiproc
def test_a_non_finite_weight_in_one_ranks_rows_stops_every_rank_with_its_line(toy, tmp_path):
    # Row 100 is rank 1's: rank 0 never reads it, yet exits with the same line and code (bad input, 2).
    model = poisoned(toy, tmp_path, 100)
    run = torchrun("train", "-r", str(toy / "rollouts.arrow"), "-m", str(model), "--out", str(tmp_path / "out"),
                   *TRAIN_ARGS)
    line = (f"{model / 'model.safetensors'}: tensor model.layers.0.mlp.gate_proj.weight holds nan at [100, 5]; "
            "drpo refuses non-finite weights (they make every log-prob and gradient NaN)")
    errors = sorted(e for e in run.stderr.splitlines() if e.startswith("error: "))
    assert errors == [f"error: [rank 0] {line}", f"error: [rank 1] {line}"], run.stderr[-3000:]
    assert run.stderr.count("exitcode  : 2") == 2, run.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.multiproc
def test_two_ranks_agree_on_skipping_non_finite_steps(toy, tmp_path):
    # A = 3e38 overflows −A·r to −inf on some tokens of every step, not necessarily on every rank's
    # rows: the loss and the gradient norm are global, so every rank skips the same steps.
    table = pa.ipc.open_file(str(toy / "rollouts.arrow")).read_all()
    table = table.drop_columns(["reward", "group_id"]).append_column(
        "advantage", pa.array(np.full(table.num_rows, 3e38, dtype=np.float32)))
    with pa.OSFile(str(tmp_path / "huge.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    run = torchrun("train", "-r", str(tmp_path / "huge.arrow"), "-m", str(toy / "model"), "--out",
                   str(tmp_path / "skip"), "--loss", "pg-is", *TRAIN_ARGS)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "skip" / "drpo_report.json").read_text())
    assert [s["skipped"] for s in report["steps"]] == [True, True]
    old = load_file(str(toy / "model" / "model.safetensors"))
    assert all(torch.equal(t, old[k]) for k, t in load_file(str(tmp_path / "skip" / "model.safetensors")).items())
    # A learning rate whose first update leaves every later gradient norm non-finite: skipped on every rank.
    run = torchrun("train", "-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"), "--out",
                   str(tmp_path / "huge-lr"), *TRAIN_ARGS, "--lr", "3.4e37")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "huge-lr" / "drpo_report.json").read_text())
    assert [s["skipped"] for s in report["steps"]] == [False, True]


def test_a_non_finite_weight_after_an_update_is_found_in_any_ranks_shard(toy, one_rank_group):
    from drpo_cli.training.loop import _non_finite_weight

    model, _ = distributed.load_sharded_model(toy / "model", torch.device("cpu"))
    assert _non_finite_weight(model) is None
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.to_local()[2, 3] = float("-inf")
    assert _non_finite_weight(model) == "model.layers.1.mlp.up_proj.weight"


# ---- two nodes on this machine ---------------------------------------------------------------------


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_nodes_write_only_from_global_rank_0_and_train_like_one_process(toy, tmp_path):
    # Two torchrun agents, one per "node", meeting at 127.0.0.1: each node's only rank has LOCAL_RANK 0,
    # so a writer chosen by LOCAL_RANK would write twice. Each node runs in its own directory with a
    # relative --out: node 1's directory must stay empty, node 0's hold the one output.
    common = ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"), *TRAIN_ARGS, "--anchor", "proximal"]
    port = free_port()
    nodes = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                   "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                   "-m", "drpo_cli", *common, "--out", "out"]
        nodes.append(subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    outs = [p.communicate(timeout=300) for p in nodes]
    for p, (_, err) in zip(nodes, outs):
        assert p.returncode == 0, err[-3000:]
    assert [out.count("wrote ") for out, _ in outs] == [1, 0]  # global rank 0 alone reports
    assert list((tmp_path / "node1").iterdir()) == []  # nothing written on the other node, not even a temporary
    assert [p.name for p in (tmp_path / "node0").iterdir()] == ["out"]

    one_process(*common, "--out", str(tmp_path / "one"))
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    two = load_file(str(tmp_path / "node0" / "out" / "model.safetensors"))
    assert one.keys() == two.keys()
    assert_trained_alike(one, two, lr=1e-3, steps=2)  # TRAIN_ARGS: --lr 1e-3, --minibatches 2
    assert sorted(p.name for p in (tmp_path / "node0" / "out").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    r1 = json.loads((tmp_path / "one" / "drpo_report.json").read_text())
    r2 = json.loads((tmp_path / "node0" / "out" / "drpo_report.json").read_text())
    for section in ("steps", "final", "input", "loss", "notes"):
        assert_same_json(r1[section], r2[section], section)


@pytest.mark.multiproc
def test_two_ranks_batch_norm_veto_and_seq_mask_tis_like_one(toy, tmp_path):
    # The step's weight mean is an exact integer sum over ranks, but each rank recomputes π_old, which the
    # weights come from, on its own micro-batches: the factor agrees to the weights' rounding (METRIC_ULPS).
    common = ["-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"), *TRAIN_ARGS, "--anchor", "proximal",
              "--correction", "seq-mask-tis", "--is-band", "0.9", "1.1", "--is-veto", "0.3", "--is-batch-norm"]
    ranks_like_one(tmp_path, "train", *common)
    one, two = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "ranks" / "model.safetensors"))
    assert_trained_alike(one, two, lr=1e-3, steps=2)  # TRAIN_ARGS: --lr 1e-3, --minibatches 2
    r1 = json.loads((tmp_path / "one" / "drpo_report.json").read_text())
    r2 = json.loads((tmp_path / "ranks" / "drpo_report.json").read_text())
    factors = [s["metrics"]["is/batch_norm_factor"] for s in r1["steps"]]
    assert 1.0 not in factors
    assert_reordered([s["metrics"]["is/batch_norm_factor"] for s in r2["steps"]], factors, METRIC_ULPS,
                     scale=np.maximum(1.0, np.abs(factors)), msg="is/batch_norm_factor")
    # Counts of decisions on π_old (ρ < C, the band): equal unless a token sits within π_old's rounding of
    # a threshold, and one token more or less would move a fraction far beyond any rounding bound.
    for key in ("veto/seq_frac", "reject/seq_frac"):
        assert [s["metrics"][key] for s in r1["steps"]] == [s["metrics"][key] for s in r2["steps"]]
    assert_same_json(r1["filters"], r2["filters"], "filters")


@pytest.mark.multiproc
def test_two_ranks_bf16_fsdp_mixed_precision_on_gloo_like_one_bf16_process(toy, tmp_path):
    # FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32) on CPU / gloo against one
    # process under CPU autocast: both round every GEMM input to bf16 (ε = 2^-7), FSDP also its norms'
    # and embeddings' parameters, so they agree to a few ε, not bit for bit. Compared at the first step
    # (the same starting weights); the sharded master weights stay float32.
    common = ["-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"), *TRAIN_ARGS, "--dtype", "bf16"]
    ranks_like_one(tmp_path, "train", *common)
    eps = torch.finfo(torch.bfloat16).eps
    r1 = json.loads((tmp_path / "one" / "drpo_report.json").read_text())
    r2 = json.loads((tmp_path / "ranks" / "drpo_report.json").read_text())
    s1, s2 = r1["steps"][0], r2["steps"][0]
    assert s1["tokens"] == s2["tokens"]
    assert s2["loss"] == pytest.approx(s1["loss"], rel=4 * eps)
    assert s2["grad_norm"] == pytest.approx(s1["grad_norm"], rel=4 * eps)
    for key in ("kl/k3_mean", "delta/abs_mean", "ratio/mean"):
        assert s2["metrics"][key] == pytest.approx(s1["metrics"][key], rel=4 * eps)
    two = load_file(str(tmp_path / "ranks" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in two.values())
