"""Shared test fixtures: one torch thread, small schema-v1 rollout tables written with pyarrow directly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

TOY = Path(__file__).resolve().parents[1] / "examples" / "toy"  # the bundled example, committed
TOY_MODEL, TOY_ROLLOUTS = TOY / "model", TOY / "rollouts.arrow"
TOY_VERSION = 8  # examples/toy/model/drpo_checkpoint.json
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


def require_toy() -> None:
    """The bundled example is committed: a checkout without it fails (never skips)."""
    if not TOY_MODEL.is_dir():
        pytest.fail("examples/toy/model is missing: it is committed (git checkout examples/toy), "
                    "or rebuild it with python examples/make_example.py")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """A private copy of the bundled example: model/ (policy version 8) and rollouts.arrow."""
    require_toy()
    root = tmp_path_factory.mktemp("toy")
    shutil.copytree(TOY, root, dirs_exist_ok=True)
    return root
