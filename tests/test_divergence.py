"""Divergence diagnostics (SPEC.md §2): elementwise values by hand and at the edges of [0, 1], the
Diagnostics accumulator against direct formulas, and exact merging (in process and across ranks)."""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import EPS64, assert_reordered

from drpo_cli.base.errors import ConfigError
from drpo_cli.objectives import divergence as D

LN = math.log


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# ---- elementwise ------------------------------------------------------------------------------------


def test_elementwise_hand_values():
    lp, mu = t(LN(0.6)), t(LN(0.4))  # π = 0.6, μ = 0.4
    assert float(D.log_ratio(lp, mu)) == pytest.approx(0.4054651081)  # ln 1.5
    assert float(D.ratio(lp, mu)) == pytest.approx(1.5)
    assert float(D.prob_delta(lp, mu)) == pytest.approx(0.2)
    assert float(D.binary_tv(mu, lp)) == pytest.approx(0.2)  # |0.4 − 0.6|
    # 0.4·ln(0.4/0.6) + 0.6·ln(0.6/0.4) = 0.2·ln 1.5 = 0.0810930216
    assert float(D.binary_kl(lp, mu)) == pytest.approx(0.0810930216)
    assert float(D.k1(lp, mu)) == pytest.approx(-0.4054651081)  # −ln 1.5
    assert float(D.k2(lp, mu)) == pytest.approx(0.0822009795)  # ½·0.4054651² = ½·0.16440195
    assert float(D.k3(lp, mu)) == pytest.approx(0.0945348919)  # (1.5 − 1) − ln 1.5


def test_log_ratio_clamp():
    assert D.log_ratio(t(0.0, -50.0), t(-50.0, 0.0)).tolist() == [20.0, -20.0]
    assert float(D.ratio(t(0.0), t(-1e4))) == pytest.approx(math.exp(20.0))


def test_prob_delta_precise_near_one_and_near_zero():
    # Near 1: π = e^−1e−7, μ = e^−2e−7; Δ = μ·expm1(1e−7) computed by math in float64.
    for a, b in [(-1e-7, -2e-7), (-2e-7, -1e-7), (-100.0, -101.0), (-101.0, -100.0), (-3e-8, -40.0)]:
        expected = math.exp(b) * math.expm1(a - b)
        got = D.prob_delta(torch.tensor([a], dtype=torch.float32), torch.tensor([b], dtype=torch.float32))
        assert float(got) == pytest.approx(expected, rel=1e-5)


EDGES = t(0.0, -1e-30, -1e-12, -1e-7, -0.1, -0.6931, -0.6932, -5.0, -30.0, -100.0, -800.0, -1e4, -1e30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_elementwise_finite_on_edges(dtype):
    lp, mu = torch.meshgrid(EDGES.to(dtype), EDGES.to(dtype), indexing="ij")
    for fn in (D.log_ratio, D.ratio, D.prob_delta, D.binary_tv, D.binary_kl, D.k1, D.k2, D.k3):
        out = fn(lp, mu)
        assert torch.isfinite(out).all(), fn.__name__
    assert (D.binary_kl(lp, mu) >= 0).all() and (D.k3(lp, mu) >= 0).all()
    assert (D.binary_tv(lp, mu) <= 1).all()


def test_binary_kl_edges_and_direct_formula():
    # μ = 1 (logμ = 0): D = 1·ln(1/π) + 0 = −logπ.
    assert float(D.binary_kl(t(LN(0.25)), t(0.0))) == pytest.approx(LN(4.0))
    assert float(D.binary_kl(t(0.0), t(0.0))) == 0.0
    # π = 1, μ = 0.5: true value is +inf; the floored log keeps it finite and large.
    assert 10 < float(D.binary_kl(t(0.0), t(LN(0.5)))) < 1e3
    # Interior points against the textbook formula.
    g = torch.Generator().manual_seed(0)
    pi, mu = (
        torch.rand(1000, generator=g, dtype=torch.float64),
        torch.rand(1000, generator=g, dtype=torch.float64),
    )
    direct = mu * torch.log(mu / pi) + (1 - mu) * torch.log((1 - mu) / (1 - pi))
    torch.testing.assert_close(D.binary_kl(pi.log(), mu.log()), direct, rtol=1e-10, atol=1e-12)


def test_token_diagnostics_outside_and_harmful():
    # Δ = +0.3, +0.3, −0.3, −0.3, +0.1 with A = +, −, +, −, +; tr_delta = 0.2
    pi, mu = t(0.5, 0.5, 0.2, 0.2, 0.3), t(0.2, 0.2, 0.5, 0.5, 0.2)
    out = D.token_diagnostics(pi.log(), mu.log(), t(1.0, -1.0, 1.0, -1.0, 1.0), tr_delta=0.2)
    assert out["outside"].tolist() == [True, True, True, True, False]
    assert out["harmful"].tolist() == [True, False, False, True, False]


# ---- sequence scores ---------------------------------------------------------------------------------


def test_sequence_scores_against_loop():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(50, generator=g, dtype=torch.float64)
    seq = torch.randint(0, 6, (50,), generator=g)  # sequence 6 and 7 get no token
    mask = torch.rand(50, generator=g) > 0.3
    values[~mask] = float("nan")
    for reduce in ("sum", "amax", "mean"):
        got = D.sequence_scores(values, seq, 8, mask=mask, reduce=reduce)
        for s in range(8):
            v = values[(seq == s) & mask]
            want = 0.0 if v.numel() == 0 else {"sum": v.sum, "amax": v.max, "mean": v.mean}[reduce]()
            assert float(got[s]) == pytest.approx(float(want))


# ---- the accumulator ----------------------------------------------------------------------------------


def audit_data(n: int = 4000, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    mu_lp = torch.log(torch.rand(n, generator=g, dtype=torch.float64).clamp(min=1e-9))
    logp = (mu_lp + 0.4 * torch.randn(n, generator=g, dtype=torch.float64)).clamp(max=0.0)
    logp[:5] = t(0.0, -40.0, -1e-9, -30.0, -25.0)  # a few extreme tokens, |logr| > 20
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    adv[torch.rand(n, generator=g) < 0.1] = 0.0
    mask = torch.rand(n, generator=g) > 0.15
    lag = torch.randint(-1, 12, (n,), generator=g)
    position = torch.randint(0, 2000, (n,), generator=g)
    entropy = torch.rand(n, generator=g, dtype=torch.float64) * 3
    for x in (logp, mu_lp, adv, entropy):
        x[~mask] = float("nan")  # masked positions must never reach a statistic
    return logp, mu_lp, adv, mask, lag, position, entropy


def kth(values: torch.Tensor, q: float) -> float:
    return float(values.sort().values[max(1, math.ceil(q * values.numel())) - 1])


def test_summary_against_direct_formulas():
    logp, mu_lp, adv, mask, lag, position, entropy = audit_data()
    diag = D.Diagnostics(tr_delta=0.2, drpo_deltas=[0.1])
    diag.update(logp, mu_lp, adv, mask, lag=lag, position=position, entropy=entropy)
    s = diag.summary()

    lp, m, a = logp[mask], mu_lp[mask], adv[mask]
    pi, mu = lp.exp(), m.exp()
    delta = pi - mu
    logr = (lp - m).clamp(-20, 20)
    r = logr.exp()
    n = lp.numel()
    assert s["data/tokens"] == n
    approx = lambda x: pytest.approx(float(x), rel=1e-9, abs=1e-12)
    assert s["data/zero_adv_frac"] == approx((a == 0).double().mean())
    assert s["data/rare_token_frac"] == approx((mu <= 0.01).double().mean())
    assert s["data/behavior_nll_mean"] == approx(-m.mean())
    assert s["tr/outside_frac"] == approx((delta.abs() > 0.2).double().mean())
    harmful = ((a > 0) & (delta > 0.2)) | ((a < 0) & (delta < -0.2))
    assert s["tr/harmful_frac"] == approx(harmful.double().mean())
    assert s["tr/outside_up_frac"] == approx((delta > 0.2).double().mean())
    assert s["tr/outside_down_frac"] == approx((delta < -0.2).double().mean())
    assert s["delta/abs_mean"] == approx(delta.abs().mean()) and s["tv/binary_mean"] == s["delta/abs_mean"]
    assert s["delta/abs_max"] == approx(delta.abs().max())
    assert s["ratio/mean"] == approx(r.mean())
    assert s["ratio/min"] == approx(r.min()) and s["ratio/max"] == approx(r.max())
    assert s["logr/mean"] == approx(logr.mean())
    assert s["logr/std"] == pytest.approx(float(logr.std(unbiased=False)), rel=1e-6)
    assert s["logr/abs_max"] == approx(logr.abs().max())
    assert s["kl/k1_mean"] == approx(-logr.mean())
    assert s["kl/k2_mean"] == approx((0.5 * logr**2).mean())
    assert s["kl/k3_mean"] == approx((r - 1 - logr).mean())
    # Textbook Binary-KL with 1 − p floored at the smallest normal double, as documented (the
    # π = 1 token would otherwise be +inf).
    tiny = torch.finfo(torch.float64).tiny
    bkl = mu * torch.log(mu / pi) + (1 - mu) * torch.log((1 - mu).clamp(min=tiny) / (1 - pi).clamp(min=tiny))
    assert s["kl/binary_mean"] == pytest.approx(float(bkl.mean()), rel=1e-6)
    assert s["kl/binary_max"] == pytest.approx(float(bkl.max()), rel=1e-6)
    assert s["entropy/mean"] == approx(entropy[mask].mean())

    clipped = ((a > 0) & (r > 1.28)) | ((a < 0) & (r < 0.8))
    assert s["ppo_clip/clip_frac"] == approx(clipped.double().mean())
    tv_masked = ((a > 0) & (delta > 0.15)) | ((a < 0) & (delta < -0.15))
    assert s["dppo_tv/mask_frac"] == approx(tv_masked.double().mean())
    kl_masked = (((a > 0) & (logr > 0)) | ((a < 0) & (logr < 0))) & (bkl > 0.05)
    assert s["dppo_kl/mask_frac"] == approx(kl_masked.double().mean())
    w_spo = 1 - torch.sign(a) * (r - 1) / 0.2
    assert s["weight/spo_corrective_frac"] == approx((w_spo < 0).double().mean())
    assert s["weight/spo_attenuated_frac"] == approx((w_spo < 0.5).double().mean())
    assert s["weight/spo_mean"] == approx(w_spo.mean())
    for delta_drpo, stats in (
        (12.5, {k[12:]: v for k, v in s.items() if k.startswith("weight/drpo_")}),
        (0.1, s["what_if"]["drpo"][0]),
    ):
        w = 1 - torch.sign(a) * delta / delta_drpo
        assert stats["corrective_frac"] == approx((w < 0).double().mean())
        assert stats["attenuated_frac"] == approx((w < 0.5).double().mean())
        assert stats["mean"] == approx(w.mean())
        assert stats["min"] == approx(w.min()) and stats["max"] == approx(w.max())
        for name, q in D.LOW_QUANTILES.items():  # binned as w − 1 at ±1.2 % of |w − 1|
            assert abs(stats[name] - kth(w, q)) <= 0.012 * abs(kth(w, q) - 1) + 1e-6
    assert s["what_if"]["drpo"][0]["delta"] == 0.1 and s["what_if"]["drpo"][0]["boundary_reachable"]
    assert 0 < s["what_if"]["drpo"][0]["corrective_frac"] < 0.5  # the sweep point sees corrections
    assert s["weight/drpo_corrective_frac"] == 0.0
    assert len(s["notes"]) == 1 and "delta=12.5 >= 1" in s["notes"][0] and "unreachable" in s["notes"][0]

    # Quantiles from fixed bins: within ±1.2 % relative (100 bins per decade).
    for name, q in D.QUANTILES.items():
        want = kth(delta.abs(), q)
        assert abs(s[f"delta/abs_{name}"] - want) <= 0.012 * want + 1e-8
    for name, q in {"p1": 0.01, **D.QUANTILES}.items():
        want = kth(logr, q)
        assert abs(math.log(s[f"ratio/{name}"]) - want) <= 0.012 * abs(want) + 1e-6

    # Breakdowns against a loop.
    k3 = r - 1 - logr
    lag_m, pos_m = lag[mask], position[mask]
    lag_bucket = torch.where(lag_m < 0, 9, lag_m.clamp(max=8))
    labels = [str(i) for i in range(8)] + ["8+", "unknown"]
    for b, label in enumerate(labels):
        sel = lag_bucket == b
        got = s["breakdowns"]["lag"][label]
        assert got["tokens"] == int(sel.sum())
        assert got["outside_frac"] == approx((delta[sel].abs() > 0.2).double().mean())
        assert got["harmful_frac"] == approx(harmful[sel].double().mean())
        assert got["delta_abs_mean"] == approx(delta[sel].abs().mean())
        assert got["k3_mean"] == approx(k3[sel].mean())
        assert got["logr_mean"] == approx(logr[sel].mean())
    mu_sel = {
        "<=0.01": mu <= 0.01,
        "<=0.1": (mu > 0.01) & (mu <= 0.1),
        "<=0.5": (mu > 0.1) & (mu <= 0.5),
        ">0.5": mu > 0.5,
    }
    for label, sel in mu_sel.items():
        assert s["breakdowns"]["mu"][label]["tokens"] == int(sel.sum())
        assert s["breakdowns"]["mu"][label]["k3_mean"] == approx(k3[sel].mean())
    pos_sel = {"[0,16)": pos_m < 16, "[16,64)": (pos_m >= 16) & (pos_m < 64), "[1024,inf)": pos_m >= 1024}
    for label, sel in pos_sel.items():
        assert s["breakdowns"]["position"][label]["tokens"] == int(sel.sum())
        assert s["breakdowns"]["position"][label]["harmful_frac"] == approx(harmful[sel].double().mean())
    assert "unknown" not in s["breakdowns"]["position"]
    coarse = s["weight_histograms"]["weight/spo"]
    assert coarse["edges"] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert coarse["fracs"][0] == approx((w_spo < 0).double().mean())
    assert coarse["fracs"][3] == approx(((w_spo >= 1.0) & (w_spo < 1.5)).double().mean())
    assert sum(coarse["fracs"]) == pytest.approx(1.0)


def test_tokens_with_a_non_finite_log_prob_are_counted_and_left_out():
    # A diverged model's NaN / inf log-probs: no statistic, no histogram bin; a note counts them.
    import numpy as np

    from drpo_cli.model.histograms import MuPiHistogram

    lp = t(LN(0.5), math.nan, LN(0.25), -math.inf, math.inf)
    mu, adv, mask = t(LN(0.4), LN(0.5), LN(0.5), LN(0.5), LN(0.5)), t(1, 1, -1, 1, 1), torch.ones(5, dtype=torch.bool)
    d = D.Diagnostics(0.2, {"drpo": {}})
    d.update(lp, mu, adv, mask)
    s = d.summary()
    assert s["data/tokens"] == 2 and s["delta/abs_mean"] == pytest.approx((0.1 + 0.25) / 2)
    assert s["notes"][-1] == ("3 of 5 trained tokens have a non-finite log-prob under the model (NaN or ±inf: "
                              "diverged weights or an overflow); every statistic is over the other 2")
    picture = MuPiHistogram(bins=4)
    picture.update(lp.numpy(), mu.numpy(), adv.numpy(), mask.numpy())
    assert int(picture.counts.sum()) == 2 and picture.counts[0, 1, 2] == 1 and picture.counts[1, 2, 1] == 1
    assert np.isfinite(picture.counts).all()


def test_selected_losses_only_and_missing_lag_position():
    logp, mu_lp, adv, mask, *_ = audit_data(300)
    diag = D.Diagnostics(losses={"ppo-clip": {"dual_clip": 3.0}})
    diag.update(logp, mu_lp, adv, mask)
    s = diag.summary()
    assert "ppo_clip/clip_frac" in s and "dppo_tv/mask_frac" not in s and "weight/drpo_mean" not in s
    assert "entropy/mean" not in s and s["notes"] == []
    assert list(s["breakdowns"]["lag"]) == ["unknown"] and list(s["breakdowns"]["position"]) == ["unknown"]
    assert s["breakdowns"]["lag"]["unknown"]["tokens"] == s["data/tokens"]


def test_empty_accumulator_and_validation():
    s = D.Diagnostics().summary()
    assert s["data/tokens"] == 0 and s["tr/outside_frac"] is None and s["delta/abs_p50"] is None
    assert s["weight/drpo_p50"] is None and s["breakdowns"]["lag"] == {}
    diag = D.Diagnostics()
    diag.update(t(-1.0), t(-1.0), t(1.0), torch.tensor([False]))
    assert diag.summary()["data/tokens"] == 0
    with pytest.raises(ConfigError, match="tr_delta must be a number > 0"):
        D.Diagnostics(tr_delta=0)
    with pytest.raises(ConfigError, match="drpo: delta must be > 0, got -0.1"):
        D.Diagnostics(drpo_deltas=[-0.1])
    with pytest.raises(ConfigError, match="unknown loss 'grpo'"):
        D.Diagnostics(losses={"grpo": {}})


def chunks(data, bounds):
    return [tuple(x[a:b] for x in data) for a, b in itertools.pairwise(bounds)]


def merge(a: D.Diagnostics, b: D.Diagnostics) -> D.Diagnostics:
    """b's accumulated state folded into a with each key's declared op: what all_reduce_ does across ranks."""
    if b.config() != a.config():
        raise ConfigError(f"cannot merge diagnostics with config {b.config()} into {a.config()}")
    a._fold(b._state)
    return a


def state_of(diag: D.Diagnostics) -> dict:
    return {k: v.clone() for k, v in diag._state.items()}


def test_merged_equals_unmerged():
    data = audit_data()
    whole = D.Diagnostics(drpo_deltas=[0.1, 0.3])
    logp, mu_lp, adv, mask, lag, position, entropy = data
    whole.update(logp, mu_lp, adv, mask, lag=lag, position=position, entropy=entropy)
    parts = []
    for lp, m, a, k, lg, pos, ent in chunks(data, [0, 7, 1500, 1501, 4000]):
        part = D.Diagnostics(drpo_deltas=[0.1, 0.3])
        part.update(
            lp.float(), m.float(), a, k, lag=lg, position=pos, entropy=ent
        )  # float32 in, as in training
        parts.append(part)
    merged = parts[0]
    for part in parts[1:]:
        merge(merged, part)
    # float32 inputs: compare against the whole batch fed in float32 too.
    whole32 = D.Diagnostics(drpo_deltas=[0.1, 0.3])
    whole32.update(logp.float(), mu_lp.float(), adv, mask, lag=lag, position=position, entropy=entropy)
    a, b = state_of(whole32), state_of(merged)
    for key in a:
        if key.split("#")[0] in D.PER_UPDATE_METRICS:  # a selection over each update's tokens, by definition
            continue
        if key.startswith(("sum_", "by_")) or key.endswith("sum_w"):
            # float64 sums of 4,000 values in five parts instead of one: rounding only, within log2(n) ε64 of
            # the tensor's largest sum (measured: 1.3 with every kernel set)
            assert_reordered(b[key], a[key], 16, eps=EPS64, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key  # counts, histograms, maxima: exact
    sa, sb = whole32.summary(), merged.summary()
    for key in sa:
        if key in D.PER_UPDATE_METRICS:
            continue
        if re.search(r"_p\d+$", key) or key.endswith(("_frac", "/tokens", "max", "min")):
            assert sa[key] == sb[key], key  # quantiles, fractions, extremes: identical
    assert sa["breakdowns"]["lag"]["3"]["tokens"] == sb["breakdowns"]["lag"]["3"]["tokens"]
    assert whole.summary()["data/tokens"] == sb["data/tokens"]
    with pytest.raises(ConfigError, match="cannot merge"):
        merge(merged, D.Diagnostics(tr_delta=0.1))


def test_all_reduce_is_a_no_op_without_a_process_group():
    logp, mu_lp, adv, mask, *_ = audit_data(200)
    diag = D.Diagnostics()
    diag.update(logp, mu_lp, adv, mask)
    before = diag.summary()
    assert diag.all_reduce_().summary() == before


RANK_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[3])
    from test_divergence import audit_data
    from drpo_cli.objectives.divergence import Diagnostics
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
    logp, mu_lp, adv, mask, lag, position, entropy = audit_data()
    shard = slice(0, 1700) if rank == 0 else slice(1700, None)
    diag = Diagnostics(drpo_deltas=[0.1])
    diag.update(logp[shard], mu_lp[shard], adv[shard], mask[shard], lag=lag[shard], position=position[shard])
    diag.all_reduce_()
    torch.save(dict(diag._state), sys.argv[2] + f".rank{rank}")
    dist.destroy_process_group()
    """
)


def test_all_reduce_single_rank_round_trips_state(tmp_path):
    # World size 1 exercises the packing / unpacking around the collectives in-process.
    import torch.distributed as dist

    logp, mu_lp, adv, mask, lag, position, entropy = audit_data(500)
    diag = D.Diagnostics(drpo_deltas=[0.1])
    diag.update(logp, mu_lp, adv, mask, lag=lag, position=position, entropy=entropy)
    before = state_of(diag)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        diag.all_reduce_()
    finally:
        dist.destroy_process_group()
    after = state_of(diag)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.multiproc  # two Python processes with torch: ~10 s
def test_all_reduce_across_two_ranks_equals_merge(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    store = str(tmp_path / "store")
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), store, tests_dir]) for r in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    logp, mu_lp, adv, mask, lag, position, _ = audit_data()
    local = []
    for shard in (slice(0, 1700), slice(1700, None)):
        d = D.Diagnostics(drpo_deltas=[0.1])
        d.update(logp[shard], mu_lp[shard], adv[shard], mask[shard], lag=lag[shard], position=position[shard])
        local.append(d)
    merged = state_of(merge(local[0], local[1]))
    for rank in (0, 1):
        reduced = torch.load(f"{store}.rank{rank}")
        for key, value in merged.items():
            # Two addends: a + b is the same double in either order, so everything is bit-identical.
            assert torch.equal(reduced[key], value), key
