"""Mixture of experts: the routed_experts column, the routing mismatch audit and routing replay (R3).

Tiny random MoE models of every supported family; the "sampler" is the same model with perturbed
router weights, so its logged routing differs from the trainer's own at a measurable share of
positions. Replay is checked against a naive per-position reference router written here.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from conftest import GRAD_ULPS, LOGP_ULPS, assert_reordered, assert_trained_alike
from toy import TINY
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.qwen3_5_moe import Qwen3_5MoeTextConfig
from typer.testing import CliRunner

from drpo_cli.base.errors import ConfigError, InputError
from drpo_cli.cli import app
from drpo_cli.model import checkpoint, moe
from drpo_cli.model.batching import plan_micro_batches
from drpo_cli.model.logprobs import token_logprobs
from drpo_cli.rollouts.files import open_rollouts
from drpo_cli.rollouts.routing import routed_experts_from_vllm
from drpo_cli.rollouts.rows import load_rows
from drpo_cli.rollouts.validate import validate_rollouts
from drpo_cli.rollouts.writer import RolloutWriter

V = 64
_COMMON = dict(vocab_size=V, **TINY, eos_token_id=None, bos_token_id=None, pad_token_id=None)
CONFIGS = {
    "qwen3_moe": lambda: Qwen3MoeConfig(**_COMMON, intermediate_size=64, moe_intermediate_size=16, head_dim=8,
                                        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "qwen3_moe_unnormalised": lambda: Qwen3MoeConfig(**_COMMON, intermediate_size=64, moe_intermediate_size=16,
                                                     head_dim=8, num_experts=8, num_experts_per_tok=3,
                                                     norm_topk_prob=False),
    # a dense middle layer: the column's layer axis is the MoE layers 0 and 2
    "qwen2_moe": lambda: Qwen2MoeConfig(**{**_COMMON, "num_hidden_layers": 3}, intermediate_size=64,
                                        moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=8,
                                        num_experts_per_tok=2, mlp_only_layers=[1]),
    "mixtral": lambda: MixtralConfig(**_COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
    "olmoe": lambda: OlmoeConfig(**_COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2),
    # the DRPO paper's Qwen3.5-35B-A3B family: linear-attention and full-attention layers, a shared expert
    "qwen3_5_moe": lambda: Qwen3_5MoeTextConfig(
        **_COMMON, head_dim=8, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=8,
        num_experts_per_tok=2, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"]),
}
ROUTER_SCALE = 20.0  # router weights × this: decisive routing, so a perturbed sampler mis-routes some positions


def tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind]()).eval()
    spec = moe.MoeSpec.of(model.config)
    with torch.no_grad():
        for gate in moe.routers(model, spec):
            gate.weight.mul_(ROUTER_SCALE)
    return model


def perturbed(model: torch.nn.Module, noise: float, seed: int = 1) -> torch.nn.Module:
    """A copy whose routers are perturbed by `noise` × their own scale: a sampler that mis-routes."""
    import copy

    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in moe.routers(other, moe.MoeSpec.of(other.config)):
            gate.weight.add_(noise * gate.weight.std() * torch.randn(gate.weight.shape, generator=gen))
    return other


def rollout_rows(sampler: torch.nn.Module, n: int = 5, seed: int = 0) -> list[dict]:
    """Rows of random prompts/responses (lengths differ) with the sampler's logged routing."""
    spec = moe.MoeSpec.of(sampler.config)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        p, r = int(rng.integers(1, 6)), int(rng.integers(1, 7))
        prompt, response = rng.integers(0, V, p).tolist(), rng.integers(0, V, r).tolist()
        routed = moe.own_routing(sampler, spec, torch.tensor(prompt + response[:-1]))
        rows.append({"prompt_ids": prompt, "response_ids": response, "behavior_logprobs": [-1.0] * r,
                     "loss_mask": [bool(x) for x in rng.integers(0, 2, r) | (np.arange(r) == 0)],
                     "advantage": float(rng.normal()), "sample_id": f"s{i}", "routed_experts": routed})
    return rows


def write_rows(path, rows: list[dict]):
    with RolloutWriter(path, logprobs="processed") as w:
        w.write_rows(rows)
    return path


def logprobs(model, rows, *, replay: bool | None, budget: int = 24, padding: str = "right") -> torch.Tensor:
    """(T,) log-probs in flat token order through drpo's engine (micro-batched, padded)."""
    spec = moe.MoeSpec.of(model.config)
    rows = moe.check_routing(rows, spec, "model")
    if replay is not None:
        moe.install(model, spec, replay=replay)
    out = torch.zeros(rows.num_tokens)
    try:
        for mb in plan_micro_batches(rows, np.arange(rows.num_rows), budget, padding_side=padding):
            logp, _ = token_logprobs(model, mb)
            out[mb.token_index] = logp
    finally:
        moe.remove(model)
    return out


def naive_replay(model, rows: list[dict]) -> torch.Tensor:
    """Reference: one row at a time, unpadded, each router replaced by a per-position loop that uses the
    logged experts with weights p_e / Σ p (or p_e) from the current router's softmax."""
    spec = moe.MoeSpec.of(model.config)
    gates = moe.routers(model, spec)
    renorm = spec.rule.renorm == "always" or spec.norm_topk_prob
    out = []
    for row in rows:
        logged = torch.as_tensor(np.asarray(row["routed_experts"]), dtype=torch.int64)  # (L, n_layers, k)
        originals = [g.forward for g in gates]

        def naive(h, gate, j, logged=logged):
            h = h.reshape(-1, gate.hidden_dim)
            logits = F.linear(h, gate.weight)
            weights = []
            for pos in range(h.shape[0]):
                p = torch.softmax(logits[pos].double(), -1)
                w = torch.stack([p[e] for e in logged[pos, j]])
                weights.append(w / w.sum() if renorm else w)
            return logits, torch.stack(weights).to(logits.dtype), logged[:, j]

        for j, g in enumerate(gates):
            g.forward = lambda h, g=g, j=j: naive(h, g, j)
        try:
            ids = torch.tensor(row["prompt_ids"] + row["response_ids"][:-1])[None]
            logits = model(input_ids=ids).logits[0, len(row["prompt_ids"]) - 1:].float()  # (R, V)
        finally:
            for g, f in zip(gates, originals):
                g.forward = f
        out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(row["response_ids"])[:, None])[:, 0])
    return torch.cat(out)


@pytest.fixture(params=list(CONFIGS))
def kind(request) -> str:
    return request.param


def test_replaying_the_models_own_routing_changes_nothing_bit_for_bit(kind, tmp_path):
    model = tiny(kind)
    rows = load_rows(write_rows(tmp_path / "r.arrow", rollout_rows(model)))
    plain = {padding: logprobs(model, rows, replay=None, padding=padding) for padding in ("right", "left")}
    for padding in ("right", "left"):  # the same batches: the same arithmetic, bit for bit
        assert torch.equal(logprobs(model, rows, replay=True, padding=padding), plain[padding])
    # Left padding puts each row elsewhere in its batch and the padding positions route to other experts,
    # so the experts' GEMMs run on other token counts: equal to rounding, not bit for bit.
    assert_reordered(plain["left"], plain["right"], LOGP_ULPS, scale=1 + plain["right"].abs(), msg="padding")
    # gradients too (the router's included)
    grads = []
    for replay in (None, True):
        model.zero_grad()
        logprobs_grad = _with_grad(model, rows, replay)
        logprobs_grad.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any("gate.weight" in n for n in grads[0])
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def _with_grad(model, rows, replay):
    spec = moe.MoeSpec.of(model.config)
    rows = moe.check_routing(rows, spec, "model")
    if replay is not None:
        moe.install(model, spec, replay=replay)
    try:
        parts = [token_logprobs(model, mb)[0] for mb in plan_micro_batches(rows, np.arange(rows.num_rows), 24)]
    finally:
        moe.remove(model)
    return torch.cat(parts)


def test_replay_equals_a_naive_per_position_router_with_the_logged_experts(kind, tmp_path):
    model = tiny(kind)
    sampler = perturbed(model, 0.5)
    table = rollout_rows(sampler, n=4, seed=3)
    rows = load_rows(write_rows(tmp_path / "r.arrow", table))
    replayed = logprobs(model, rows, replay=True, padding="left")
    reference = naive_replay(model, table)
    # The reference runs one row at a time, its router weights in float64: other sums, to rounding.
    assert_reordered(replayed, reference, LOGP_ULPS, scale=1 + reference.abs(), msg="log-probs")
    assert not torch.allclose(logprobs(model, rows, replay=None), reference, atol=1e-3)  # the sampler did mis-route
    # the router's gradient under replay equals the reference's
    model.zero_grad()
    _with_grad(model, rows, True).sum().backward()
    ours = [g.weight.grad.clone() for g in moe.routers(model, moe.MoeSpec.of(model.config))]
    model.zero_grad()
    naive_replay(model, table).sum().backward()
    theirs = [g.weight.grad for g in moe.routers(model, moe.MoeSpec.of(model.config))]
    for a, b in zip(ours, theirs):
        assert a.abs().sum() > 0
        assert_reordered(a, b, GRAD_ULPS, msg="router gradient")


def expected_mismatch(model, table: list[dict]) -> tuple[np.ndarray, int]:
    """(mismatches per MoE layer, positions) at positions P−1 … P+R−2 whose token is trained, by hand."""
    spec = moe.MoeSpec.of(model.config)
    counts, positions = np.zeros(len(spec.layers), dtype=np.int64), 0
    for row in table:
        own = moe.own_routing(model, spec, torch.tensor(row["prompt_ids"] + row["response_ids"][:-1]))
        logged = np.asarray(row["routed_experts"])
        p = len(row["prompt_ids"])
        for t, trained in enumerate(row["loss_mask"]):
            if trained:
                positions += 1
                for j in range(len(spec.layers)):
                    counts[j] += set(own[p - 1 + t, j].tolist()) != set(logged[p - 1 + t, j].tolist())
    return counts, positions


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe"])
def test_inspect_reports_the_routing_mismatch_share_a_perturbed_sampler_makes(kind, tmp_path):
    model = tiny(kind)
    model.save_pretrained(tmp_path / "model")
    sampler = perturbed(model, 0.7)
    table = rollout_rows(sampler, n=6, seed=5)
    write_rows(tmp_path / "r.arrow", table)
    counts, positions = expected_mismatch(model, table)
    assert 0 < counts.sum() < positions * len(counts)  # some, not all, positions mis-routed
    reports = {}
    for extra in ([], ["--replay-routing"]):
        out = tmp_path / f"report{len(extra)}.json"
        result = CliRunner().invoke(app, ["inspect", str(tmp_path / "r.arrow"), "--model", str(tmp_path / "model"),
                                          "--device", "cpu", "--json", str(out), "--html", str(out) + ".html",
                                          "--micro-batch-tokens", "20", *extra])
        assert result.exit_code == 0, result.output
        reports[len(extra)] = json.loads(out.read_text())
        assert "MoE routing mismatch" in (tmp_path / f"report{len(extra)}.json.html").read_text()
    routing = reports[0]["model"]["routing"]
    assert routing["positions"] == positions and routing["replayed"] is False
    assert reports[0]["metrics"]["moe/routing_mismatch_frac"] == pytest.approx(counts.sum() / (positions * len(counts)))
    assert [r["mismatch_frac"] for r in routing["by_layer"]] == pytest.approx((counts / positions).tolist())
    assert [r["layer"] for r in routing["by_layer"]] == list(moe.MoeSpec.of(model.config).layers)
    # Replaying the sampler's routing brings the model's log-probs closer to what the same weights give
    # under that routing: k3 against the (all −1.0) logged values is not the point here, the change is.
    assert reports[1]["model"]["routing"]["replayed"] is True
    assert reports[1]["metrics"]["kl/k3_mean"] != reports[0]["metrics"]["kl/k3_mean"]


def test_a_moe_checkpoint_without_the_column_audits_as_before_and_replay_is_refused_before_work(tmp_path):
    model = tiny("qwen3_moe")
    model.save_pretrained(tmp_path / "model")
    table = [{k: v for k, v in row.items() if k != "routed_experts"} for row in rollout_rows(model, n=3)]
    write_rows(tmp_path / "r.arrow", table)
    args = [str(tmp_path / "r.arrow"), "--model", str(tmp_path / "model"), "--device", "cpu", "--json", "-"]
    result = CliRunner().invoke(app, ["inspect", *args])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"]["routing"] is None and "moe/routing_mismatch_frac" not in report["metrics"]
    for command in (["inspect", *args[:-2], "--replay-routing"],
                    ["train", "-r", args[0], "-m", args[2], "--device", "cpu", "--out", str(tmp_path / "out"),
                     "--replay-routing", "--quiet"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert "--replay-routing: the rollouts have no column 'routed_experts'" in result.output
    assert not (tmp_path / "out").exists()


def test_replay_of_an_unsupported_moe_architecture_is_refused_naming_it(tmp_path):
    from transformers import GraniteMoeConfig

    cfg = GraniteMoeConfig(**_COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(ConfigError, match="architecture 'granitemoe'"):
        moe.MoeSpec.of(cfg)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "model")
    rows = rollout_rows(tiny("qwen3_moe"), n=2)
    write_rows(tmp_path / "r.arrow", rows)
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "r.arrow"), "--model", str(tmp_path / "model"),
                                      "--device", "cpu", "--replay-routing", "--quiet"])
    assert result.exit_code == 2
    assert "--replay-routing: routing: architecture 'granitemoe'" in result.output
    # without replay the column is left unused, with a note, and the audit runs
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "r.arrow"), "--model", str(tmp_path / "model"),
                                      "--device", "cpu", "--json", "-"])
    assert result.exit_code == 0, result.output
    assert any("routed_experts not audited" in n for n in json.loads(result.stdout)["notes"])


def test_train_with_replay_moves_the_router_and_checkpointing_recomputes_the_same_routing(tmp_path):
    model = tiny("qwen3_moe")
    model.save_pretrained(tmp_path / "model")
    write_rows(tmp_path / "r.arrow", rollout_rows(perturbed(model, 0.7), n=6, seed=2))
    outs = {}
    for name, extra in (("replay", ["--replay-routing"]), ("replay_ckpt", ["--replay-routing", "--grad-checkpointing"]),
                        ("plain", [])):
        result = CliRunner().invoke(app, ["train", "-r", str(tmp_path / "r.arrow"), "-m", str(tmp_path / "model"),
                                          "--out", str(tmp_path / name), "--device", "cpu", "--lr", "1e-2", "--quiet",
                                          "--micro-batch-tokens", "20", *extra])
        assert result.exit_code == 0, result.output
        from safetensors.torch import load_file
        outs[name] = load_file(str(tmp_path / name / "model.safetensors"))
    src = {k: v for k, v in model.state_dict().items()}
    gate = "model.layers.0.mlp.gate.weight"
    assert (outs["replay"][gate] - src[gate]).abs().max() > 1e-4  # the router trains under replay
    for k in outs["replay"]:  # the recompute repeats the forward's ops on the same inputs: bit for bit
        assert torch.equal(outs["replay"][k], outs["replay_ckpt"][k]), k
    assert max((outs["replay"][k] - outs["plain"][k]).abs().max().item() for k in outs["plain"]) > 1e-5
    report = json.loads((tmp_path / "replay" / "drpo_report.json").read_text())
    assert report["config"]["replay_routing"] is True
    assert 0 < report["steps"][0]["metrics"]["moe/routing_mismatch_frac"] < 1  # the perturbed sampler's share
    plain = json.loads((tmp_path / "plain" / "drpo_report.json").read_text())
    assert "moe/routing_mismatch_frac" not in plain["steps"][0]["metrics"]


# ---- the column --------------------------------------------------------------------------------


def _table_with(routing, prompt=((1, 2),), response=((3, 4, 5),), type_=None):
    n = len(prompt)
    return pa.table({"prompt_ids": pa.array([list(p) for p in prompt], pa.list_(pa.int64())),
                     "response_ids": pa.array([list(r) for r in response], pa.list_(pa.int64())),
                     "behavior_logprobs": pa.array([[-1.0] * len(r) for r in response], pa.list_(pa.float32())),
                     "advantage": pa.array([1.0] * n, pa.float32()),
                     "routed_experts": pa.array(routing, type_ or pa.list_(pa.list_(pa.list_(pa.uint8()))))})


def _problems(tmp_path, table):
    path = tmp_path / "t.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return [str(p) for p in validate_rollouts(open_rollouts(path))], path


def test_validation_of_routed_experts_names_row_and_what_was_expected(tmp_path):
    ok = [[[0, 1], [2, 3]]] * 4  # 2 + 3 − 1 positions, 2 layers, k = 2
    assert _problems(tmp_path, _table_with([ok]))[0] == []
    assert _problems(tmp_path, _table_with([[[]] + ok[1:]]))[0] == []  # a position not logged
    fixed = pa.list_(pa.list_(pa.list_(pa.uint16(), 2), 2))  # fixed-size lists are accepted too
    assert _problems(tmp_path, _table_with([ok], type_=fixed))[0] == []
    found, path = _problems(tmp_path, _table_with([ok[:3]]))
    assert found == [(f"{path}, column 'routed_experts', row 0: expected length 4 (prompt + response - 1 "
                      "positions), found length 3")]
    found, _ = _problems(tmp_path, _table_with([ok[:3] + [[[0, 1]]]]))
    assert len(found) == 1 and "expected 2 layers" in found[0]
    found, _ = _problems(tmp_path, _table_with([ok[:3] + [[[0, 1], [2]]]]))
    assert len(found) == 1 and "expected 2 expert ids per layer" in found[0]
    signed = pa.list_(pa.list_(pa.list_(pa.int32())))
    found, _ = _problems(tmp_path, _table_with([ok[:3] + [[[0, -1], [2, 3]]]], type_=signed))
    assert len(found) == 1 and "expected expert ids >= 0" in found[0]
    found, _ = _problems(tmp_path, _table_with([[[[40000, 1], [2, 3]]] * 4], type_=pa.list_(pa.list_(pa.list_(pa.uint16())))))
    assert len(found) == 1 and "routed_experts" in found[0] and "int16" in found[0]


def test_rows_carry_routing_aligned_with_each_rows_positions_and_padding(tmp_path):
    routing = [[[[i, i + 1]]] * 4 for i in range(3)]
    table = _table_with(routing, prompt=((1, 2), (1,), (1, 2, 3)), response=((3, 4, 5), (3, 4, 5, 6), (3, 4)))
    path = _problems(tmp_path, table)[1]
    rows = load_rows(path)
    assert rows.routed_experts.shape == (4 + 4 + 4, 1, 2) and rows.routed_experts.dtype == np.int16
    sub = rows.select(np.array([2, 0]))
    assert sub.routed_experts[:, 0, 0].tolist() == [2] * 4 + [0] * 4
    for padding in ("left", "right"):
        (mb,) = plan_micro_batches(rows, np.arange(3), 100, padding_side=padding)
        r = mb.routed_experts  # (B, L, 1, 2)
        for j, i in enumerate(mb.rows.tolist()):
            real = mb.attention_mask[j].bool()
            assert (r[j, real, 0, 0] == i).all() and (r[j, ~real] == -1).all()


def test_check_routing_against_the_checkpoint(tmp_path):
    spec = moe.MoeSpec.of(CONFIGS["qwen2_moe"]())  # layers 0 and 2 of 3, k 2, 8 experts
    assert spec.layers == (0, 2)

    def rows_of(routing):
        return load_rows(_problems(tmp_path, _table_with([routing]))[1])

    three = [[[0, 1], [9, 9], [4, 5]]] * 4  # every decoder layer, as vLLM returns it: the dense one dropped
    assert moe.check_routing(rows_of(three), spec, "ckpt").routed_experts[:, :, 0].tolist() == [[0, 4]] * 4
    with pytest.raises(InputError, match="expected 2 layers per position .the MoE layers of ckpt., found 1"):
        moe.check_routing(rows_of([[[0, 1]]] * 4), spec, "ckpt")
    with pytest.raises(InputError, match="expected 2 expert ids per layer .num_experts_per_tok of ckpt., found 3"):
        moe.check_routing(rows_of([[[0, 1, 2], [0, 1, 2]]] * 4), spec, "ckpt")
    with pytest.raises(InputError, match=r"row 0 \(sample_id '0'\): expected expert ids in \[0, 8\) .* found 8 at "
                                         "position 3"):
        moe.check_routing(rows_of([[[0, 1], [2, 3]]] * 3 + [[[0, 8], [2, 3]]]), spec, "ckpt")


def test_writer_accepts_routed_experts_and_keeps_them(tmp_path):
    model = tiny("olmoe")
    table = rollout_rows(model, n=3)
    rows = load_rows(write_rows(tmp_path / "r.arrow", table))
    offsets = rows.routing_offsets()
    for i, row in enumerate(table):
        assert np.array_equal(rows.routed_experts[offsets[i]:offsets[i + 1]], row["routed_experts"])


def test_routed_experts_from_vllm():
    # vLLM 0.33: [positions, every decoder layer, top_k] uint8 from routed_experts_prompt_start on
    arr = np.arange(5 * 3 * 2, dtype=np.uint8).reshape(5, 3, 2)
    completion = SimpleNamespace(token_ids=[7, 8, 9], routed_experts=arr)
    assert routed_experts_from_vllm(completion, 3) == arr.astype(int).tolist()  # 3 + 3 − 1 = 5 positions
    value = routed_experts_from_vllm(completion, 4, prompt_start=1, moe_layers=[0, 2])
    assert value[0] == [] and value[1:] == arr[:, [0, 2]].astype(int).tolist()
    assert routed_experts_from_vllm(completion, 5)[:2] == [[], []]  # the skipped prompt start, inferred
    assert routed_experts_from_vllm({"token_ids": [1], "routed_experts": None}, 3) is None
    with pytest.raises(InputError, match="expected 6 positions"):
        routed_experts_from_vllm(completion, 4, prompt_start=0)
    with pytest.raises(InputError, match="expected 4 positions"):
        routed_experts_from_vllm(completion, 2)  # more positions than the row has


def test_convert_vllm_dump_fills_routed_experts(tmp_path):
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "vllm_0.11_request_outputs.jsonl"
    lines, expected = [], []
    for line in fixture.read_text().splitlines():
        request = json.loads(line)
        for c in request["outputs"]:
            positions = len(request["prompt_token_ids"]) + len(c["token_ids"]) - 1
            c["routed_experts"] = (np.arange(positions * 4).reshape(positions, 2, 2) % 8).tolist()  # uint8 in vLLM
            expected.append(c["routed_experts"])
        lines.append(json.dumps(request))
    dump = tmp_path / "vllm_moe.jsonl"
    dump.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.arrow"
    result = CliRunner().invoke(app, ["convert", str(dump), "--out", str(out), "--format", "vllm", "--logprobs",
                                      "processed", "--temperature", "0.7"])
    assert result.exit_code == 0, result.output
    table = pa.ipc.open_file(str(out)).read_all()
    assert table.num_rows == len(expected) == 2
    assert table.column("routed_experts").to_pylist() == expected
    assert [str(p) for p in validate_rollouts(open_rollouts(out))] == []


@pytest.mark.multiproc
def test_two_ranks_train_with_replay_as_one_process(tmp_path):
    from ranks import ranks_like_one
    from safetensors.torch import load_file

    model = tiny("qwen3_moe")
    model.save_pretrained(tmp_path / "model")
    write_rows(tmp_path / "r.arrow", rollout_rows(perturbed(model, 0.7), n=8, seed=4))
    common = ["-r", str(tmp_path / "r.arrow"), "-m", str(tmp_path / "model"), "--quiet", "--device", "cpu",
              "--lr", "1e-2", "--minibatches", "2", "--micro-batch-tokens", "20", "--replay-routing",
              "--grad-checkpointing"]
    ranks_like_one(tmp_path, "train", *common)
    one, two = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "ranks" / "model.safetensors"))
    assert_trained_alike(one, two, lr=1e-2, steps=2)
    gate = "model.layers.1.mlp.gate.weight"
    assert (one[gate] - model.state_dict()[gate]).abs().max() > 1e-4



@pytest.mark.multiproc
@pytest.mark.slow
def test_two_ranks_audit_routing_as_one_process(tmp_path):
    from ranks import assert_same_json, ranks_like_one, without_per_batch_whatifs

    model = tiny("qwen2_moe")
    model.save_pretrained(tmp_path / "model")
    write_rows(tmp_path / "r.arrow", rollout_rows(perturbed(model, 0.7), n=8, seed=4))
    audit = ["inspect", str(tmp_path / "r.arrow"), "--model", str(tmp_path / "model"), "--quiet", "--device", "cpu",
             "--micro-batch-tokens", "20", "--replay-routing"]
    ranks_like_one(tmp_path, *audit)
    r1, r2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "ranks"))
    assert r1["model"]["routing"]["positions"] > 0 and r1["model"]["routing"]["mismatch_frac"] > 0
    assert_same_json(r1["model"]["routing"], r2["model"]["routing"])
    assert_same_json(without_per_batch_whatifs(r1)["metrics"], without_per_batch_whatifs(r2)["metrics"])  # batches differ


def test_sharded_loading_reads_each_ranks_rows_of_weights_converted_on_load(kind, tmp_path):
    # torchrun: each rank reads its experts' rows of gate_up_proj / down_proj from the per-expert tensors on disk
    from drpo_cli.model.checkpoint import empty_model, weight_entries

    model = tiny(kind)
    model.save_pretrained(tmp_path)
    entries = weight_entries(tmp_path)
    meta = empty_model(model.config)
    fused = [n for n, p in model.named_parameters() if n not in entries]
    assert any("experts" in n for n in fused)
    for name in fused:
        full = dict(model.named_parameters())[name]
        for start, stop in ((0, 3), (3, full.shape[0])):
            out = torch.empty(stop - start, *full.shape[1:])
            assert checkpoint.read_converted_rows(meta, name, tuple(full.shape), entries, start, stop, out)
            assert torch.equal(out, full[start:stop].detach()), name
    assert not checkpoint.read_converted_rows(meta, "model.embed_tokens.weight", (V, 32), entries, 0, V, torch.empty(V, 32))


def test_lora_training_replaying_the_models_own_routing_equals_no_replay(tmp_path):
    # peft wraps the router (its default targets include `gate`): the hook sits on the wrapper
    from safetensors.torch import load_file

    model = tiny("olmoe")
    model.save_pretrained(tmp_path / "model")
    write_rows(tmp_path / "r.arrow", rollout_rows(model, n=4, seed=6))
    adapters = []
    for name, extra in (("plain", []), ("replay", ["--replay-routing"])):
        result = CliRunner().invoke(app, ["train", "-r", str(tmp_path / "r.arrow"), "-m", str(tmp_path / "model"),
                                          "--out", str(tmp_path / name), "--device", "cpu", "--lr", "1e-2", "--quiet",
                                          "--lora-r", "4", "--micro-batch-tokens", "20", *extra])
        assert result.exit_code == 0, result.output
        adapters.append(load_file(str(tmp_path / name / "adapter_model.safetensors")))
    assert adapters[0].keys() == adapters[1].keys() and any("gate" in k for k in adapters[0])
    report = json.loads((tmp_path / "replay" / "drpo_report.json").read_text())
    assert [s["metrics"]["moe/routing_mismatch_frac"] for s in report["steps"]] == [0.0]  # own routing logged
    for k in adapters[0]:
        assert torch.equal(adapters[0][k], adapters[1][k]), k
