"""Shared test fixtures: one torch thread, small schema-v1 rollout tables written with pyarrow directly."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from toy import TOY, TOY_MODEL, TOY_ROLLOUTS, TOY_VERSION, copy_toy, require_toy  # noqa: F401 - imported from here too

# `drpo train` options that keep a test run short: the settings every train test starts from.
FAST_TRAIN = ["--quiet", "--lr", "1e-3", "--micro-batch-tokens", "512"]


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests run tiny models: one thread is several times faster than two on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# A valid rollout table: 4 rows in 2 groups, every column in its canonical type.
# Row 0's last token is masked out (loss_mask 0), as tool-output tokens would be.
VALID_ROLLOUT_COLUMNS = {
    "prompt_ids": ([[1, 2], [1, 2], [3], [3]], pa.list_(pa.int64())),
    "response_ids": ([[5, 6, 7], [8], [9, 10], [11, 12]], pa.list_(pa.int64())),
    "behavior_logprobs": ([[-0.5, -1.0, -0.25], [-2.0], [-0.125, -0.75], [-3.0, -0.5]], pa.list_(pa.float32())),
    "loss_mask": ([[True, True, False], [True], [True, True], [True, True]], pa.list_(pa.bool_())),
    "reward": ([1.0, 0.0, 2.0, 4.0], pa.float32()),
    "group_id": (["g0", "g0", "g1", "g1"], pa.string()),
    "sample_id": (["s0", "s1", "s2", "s3"], pa.string()),
    "policy_version": ([3, 3, 2, 1], pa.int64()),
}


def valid_rollout_table(**replace) -> pa.Table:
    """The valid table; `replace` swaps columns: name=(values, type), or name=None to drop it."""
    columns = dict(VALID_ROLLOUT_COLUMNS)
    columns.update(replace)
    return pa.table({name: pa.array(spec[0], type=spec[1]) for name, spec in columns.items() if spec is not None})


def write_rollout_table(table: pa.Table, path: str | Path, fmt: str = "file",
                        metadata: dict[str, str] | None = None, max_chunksize: int | None = None) -> Path:
    """Write `table` as an Arrow IPC "file", IPC "stream" or "parquet" file; returns the path."""
    path = Path(path)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt in ("file", "stream"):
        new = pa.ipc.new_file if fmt == "file" else pa.ipc.new_stream
        with pa.OSFile(str(path), "wb") as sink, new(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=max_chunksize)
    else:
        raise ValueError(fmt)
    return path


@pytest.fixture
def valid_rollout_path(tmp_path: Path) -> Path:
    """The valid table as an Arrow IPC file in tmp_path."""
    return write_rollout_table(valid_rollout_table(), tmp_path / "rollouts.arrow")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """A private copy of the bundled example: model/ (policy version 8) and rollouts.arrow (toy.copy_toy)."""
    return copy_toy(tmp_path_factory.mktemp("toy"))


# ---- float comparisons -------------------------------------------------------------------------------
# Two computations of the same quantity agree bit for bit only where the same arithmetic runs: the same
# shapes, kernels and order in the same process. Through other micro-batch shapes, padding, head chunks,
# ranks, thread counts or a naive reference, float32 sums run in another order, and a CPU picks its
# kernels (and their blocking) by shape and instruction set, so the results differ in the last bits,
# differently on another CPU. Such comparisons state a bound in units of the dtype's ε, relative to the
# scale of the terms that were summed (a sum that cancels has a small result and the same absolute
# error), and say where the bound comes from. Measured maxima below: this suite's comparisons under
# ATEN_CPU_CAPABILITY=avx512, avx2 and default (torch's baseline kernels, as another CPU would pick).
EPS32 = 2.0 ** -23  # torch.finfo(torch.float32).eps
EPS64 = 2.0 ** -52  # torch.finfo(torch.float64).eps

LOGP_ULPS = 8
"""Log-probs of the same model and tokens through other batch shapes, padding, head chunks, ranks or a naive
full-logits forward: |Δ log p| ≤ LOGP_ULPS·ε32·(1 + |log p|) per token. log p = z_y − lse(z), and each
logit z is a float32 dot product whose rounding is a few ε of its terms' scale, about |z| ≲ 1 + |log p|
(the logits of a token at log p are spread by at least |log p|). Measured: 2.9 (the toy model, micro-batch
budgets 16 … 4096 against one batch), 4.7 (2 ranks against 1), 3.6 (the committed example's sampler
against one forward here), 3.3 (inspect against a row-by-row forward); bound 8, as tests/test_precision.py's
bound for the low dtypes."""

GRAD_ULPS = 64
"""Gradients of one step through other micro-batch shapes, head chunks or a naive full-logits backward:
|Δg| ≤ GRAD_ULPS·ε32·max|g| per parameter tensor. A weight's gradient is a float32 sum over every token
of the step, in another order; its terms are bounded by the tensor's largest gradient, not by the
element's (a sum that cancels to a small element keeps the error of its terms, so an elementwise
relative bound is meaningless). Measured: 38 (tests/test_train.py's and tests/test_objectives.py's steps at
budgets 16, 100 and 10⁶ against one padded forward; 26 with AVX-512 kernels, 38 with AVX2 or the
baseline), bound 64."""

ENTROPY_ULPS = 16
"""Entropies of the same logits through other shapes, head chunks, ranks or a naive forward: |ΔH| ≤
ENTROPY_ULPS·ε32·(1 + H). H = lse(z) − Σ_v p_v·z_v takes two float32 sums over the vocabulary where log p
takes one; 1 + H is the p-weighted mean of 1 + |log p|, LOGP_ULPS' scale. Measured: 5.2
(tests/test_logprobs.py's models against a naive forward), 4.8 (V = 151,936 against float64), 4.4 (2 ranks
against 1); bound 16."""

LOGP_MAX = 11.3  # max |log π| of the bundled example's model over its rollouts' tokens (11.29)

METRIC_ULPS = LOGP_ULPS * (1 + LOGP_MAX) + 1
"""A value computed from the example's log-probs where they came through other shapes or ranks (--is-batch-norm's
factor, a report's means, extremes and quantiles): |Δv| ≤ METRIC_ULPS·ε32·max(1, |v|) (≈ 1.2e-5). Each
per-token value is f(log p) with |f'| ≤ max(1, |f|) (log r: 1; r: r; k3: r − 1; the IS weights: exp), so it
moves by at most max(1, |f|)·LOGP_ULPS·ε32·(1 + LOGP_MAX), plus one rounding of f; functions of Δ = π − μ
move by π·|Δ log p| and π·(1 + |log π|) ≤ 1 (DRPO's weight 1 − sign(A)·Δ/δ: LOGP_ULPS/δ ≤ 80 at the
smallest δ used, 0.1). A mean (the factor is the exact mean of the weights), an extreme or a quantile of
such values inherits the bound. The worst case has every token's error in one direction at the largest
|log p|; measured: 0.1 for the factor (errors of both signs average out), 10.5 for an inspect report
across 2 ranks (the DRPO weights' minimum at δ 0.1), 25 for a train report after 2 steps (the final
audit's change of ratio/max since the first step, 2 nodes against 1 process)."""


def assert_reordered(actual, expected, ulps: float, *, scale=None, eps: float = EPS32, msg: str = "") -> None:
    """`actual` equals `expected`, the same formula in another summation order, within `ulps`·`eps`·`scale`.

    The model: both are float32 (or `eps`'s dtype) sums of the same terms in different orders (other batch
    shapes, chunks, kernels, ranks), so they differ by rounding only, at most a few ε of the terms' scale.
    `scale` is that scale: by default max|expected| over the whole tensor (one scale per tensor: gradients,
    weights), or a number, or an array of elementwise scales (log-probs: 1 + |log p|, since log p = z_y −
    lse(z) is as large as the logits' spread). Not the result's own magnitude otherwise: a result that
    cancels is small while its error is not.
    """
    import numpy as np

    a = np.asarray(_as_numpy(actual), dtype=np.float64)
    e = np.asarray(_as_numpy(expected), dtype=np.float64)
    assert a.shape == e.shape, f"{msg}: shapes {a.shape} vs {e.shape}"
    assert (np.isnan(a) == np.isnan(e)).all(), f"{msg}: NaN in one and not the other"
    a, e = np.nan_to_num(a, nan=0.0), np.nan_to_num(e, nan=0.0)
    unit = eps * np.broadcast_to(np.asarray(_as_numpy(np.abs(e).max(initial=0.0) if scale is None else scale),
                                            dtype=np.float64), a.shape)
    diff = np.abs(a - e)
    with np.errstate(divide="ignore", invalid="ignore"):
        measured = float(np.where(diff > 0, diff / unit, 0.0).max(initial=0.0))  # in ε of the scale
    _record(msg, measured, ulps)
    assert measured <= ulps, f"{msg}: differs by {measured:.3g} ε of the scale, bound {ulps} ε"


def _as_numpy(x):
    if hasattr(x, "detach"):  # a torch tensor
        return x.detach().cpu().double().numpy()
    return x


def _record(what: str, measured: float, bound: float) -> None:
    """With DRPO_MEASURE_ULPS=FILE, append the test, the comparison, its measured value and its bound to FILE
    (how the maxima quoted above were taken: run the tests once per ATEN_CPU_CAPABILITY)."""
    import os

    path = os.environ.get("DRPO_MEASURE_ULPS")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{test}\t{what}\t{measured:.6g}\t{bound}\n")


ADAM_DRIFT = 0.01
"""Weights after AdamW steps from the same start whose gradients agree to rounding (other micro-batch
shapes, ranks, kernels): max|ΔW| ≤ ADAM_DRIFT·lr·steps. No bound in ε exists here: AdamW divides each
gradient element by its own running magnitude, so a difference of a few ε of the tensor's largest gradient
(GRAD_ULPS) becomes an update difference of about lr·|Δg|/|g| for that element, up to 2·lr (a flipped sign)
where |g| is within rounding of 0. The bound is measured, as a fraction of the step size lr: 5.2e-3 (the
untied toy model, 2 ranks against 1, AVX-512 kernels), 4.1e-3 (token versions, 2 ranks), at most 2.5e-3
with AVX2 or baseline kernels, 7e-4 across micro-batch sizes; bound 0.01."""


def assert_trained_alike(a: dict, b: dict, lr: float, steps: int, msg: str = "") -> None:
    """The weights `a` and `b` (name → tensor), trained for `steps` AdamW steps at `lr` from the same start on
    gradients equal to rounding, differ by at most ADAM_DRIFT·lr·steps."""
    import numpy as np

    assert a.keys() == b.keys(), msg
    measured = max(float(np.abs(_as_numpy(a[k]) - _as_numpy(b[k])).max(initial=0.0)) for k in a) / (lr * steps)
    _record(f"weights {msg}", measured, ADAM_DRIFT)
    assert measured <= ADAM_DRIFT, f"{msg}: weights differ by {measured:.3g}·lr per step, bound {ADAM_DRIFT}"
