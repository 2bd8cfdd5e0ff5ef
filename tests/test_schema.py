"""Schema v1: the files under schemas/ equal the code; every accepted variant and format reads to the
same canonical data; column remapping; streaming in bounded batches; string hashing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import VALID_ROLLOUT_COLUMNS, valid_rollout_table, write_rollout_table

from drpo_cli.base.errors import ConfigError, InputError
from drpo_cli.rollouts import files, schema
from drpo_cli.rollouts.files import open_rollouts
from drpo_cli.rollouts.schema import COLUMNS, METADATA_KEYS, Problem, parse_column_map, schema_document
from drpo_cli.rollouts.validate import hash_strings, validate_rollouts

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def test_json_file_equals_the_code():
    # Regenerate with: drpo schema --json > schemas/rollout-v1.json
    assert json.loads((SCHEMAS / "rollout-v1.json").read_text()) == schema_document()


def test_markdown_mentions_every_column_and_metadata_key():
    text = (SCHEMAS / "rollout-v1.md").read_text()
    for c in COLUMNS:
        assert f"| `{c.name}` | {schema.type_name(c.arrow_type)} |" in text, c.name
    for key in METADATA_KEYS:
        assert f"`{key}`" in text


def test_spec_columns_and_requirements():
    by_name = {c.name: c for c in COLUMNS}
    assert schema.REQUIRED == ("prompt_ids", "response_ids", "behavior_logprobs")
    assert {n for n, c in by_name.items() if c.required == "one advantage source"} == {
        "advantages", "advantage", "reward", "group_id"}
    assert str(by_name["response_ids"].arrow_type) == "list<item: int64>"
    assert str(by_name["loss_mask"].arrow_type) == "list<item: bool>"


def canonical(paths, column_map=None) -> pa.Table:
    source = open_rollouts(paths, column_map)
    assert not validate_rollouts(source).total
    return pa.Table.from_batches([sb.batch for sb in source.iter_batches()])


TOKEN_VERSIONS = ([[3, 3, 3], [3], [1, 2], [0, 1]], pa.list_(pa.int64()))


def variant_table() -> pa.Table:
    """The valid table with every column in a non-canonical accepted type."""
    v = VALID_ROLLOUT_COLUMNS
    return pa.table({
        "prompt_ids": pa.array(v["prompt_ids"][0], pa.large_list(pa.int32())),
        "response_ids": pa.array(v["response_ids"][0], pa.list_(pa.uint16())),
        "behavior_logprobs": pa.array(v["behavior_logprobs"][0], pa.large_list(pa.float64())),
        "loss_mask": pa.array([[int(x) for x in r] for r in v["loss_mask"][0]], pa.list_(pa.uint8())),
        "reward": pa.array([1, 0, 2, 4], pa.int8()),
        "group_id": pa.array(["g0", "g0", "g1", "g1"]).dictionary_encode(),
        "sample_id": pa.array(v["sample_id"][0], pa.large_string()),
        "policy_version": pa.array(v["policy_version"][0], pa.int32()),
        "token_policy_versions": pa.array(TOKEN_VERSIONS[0], pa.large_list(pa.uint8())),
    })


def test_variants_cast_to_the_canonical_table(tmp_path):
    want = canonical(write_rollout_table(valid_rollout_table(token_policy_versions=TOKEN_VERSIONS), tmp_path / "c.arrow"))
    assert want.schema == pa.schema([pa.field(n, schema.COLUMN_BY_NAME[n].arrow_type) for n in want.column_names])
    got = canonical(write_rollout_table(variant_table(), tmp_path / "v.arrow"))
    assert got.equals(want)


def test_integer_group_and_sample_ids_become_strings(tmp_path):
    table = valid_rollout_table(group_id=([7, 7, 8, 8], pa.int64()), sample_id=([10, 11, 12, 13], pa.int32()))
    got = canonical(write_rollout_table(table, tmp_path / "i.arrow"))
    assert got.column("group_id").to_pylist() == ["7", "7", "8", "8"]
    assert got.column("sample_id").to_pylist() == ["10", "11", "12", "13"]


@pytest.mark.parametrize("fmt", ["file", "stream", "parquet"])
def test_formats_read_to_identical_data(tmp_path, fmt):
    want = canonical(write_rollout_table(valid_rollout_table(token_policy_versions=TOKEN_VERSIONS),
                                         tmp_path / "want.arrow"))
    suffix = ".parquet" if fmt == "parquet" else ".arrow"
    got = canonical(write_rollout_table(variant_table(), tmp_path / f"got{suffix}", fmt=fmt, max_chunksize=3))
    assert got.equals(want)


def test_directory_of_files_reads_in_sorted_order(tmp_path):
    table = valid_rollout_table()
    d = tmp_path / "shards"
    d.mkdir()
    # Written out of order; names sort as 00 < 01 < 02. Non-rollout files are ignored.
    write_rollout_table(table.slice(3), d / "02.parquet", fmt="parquet")
    write_rollout_table(table.slice(0, 2), d / "00.arrow", fmt="stream")
    write_rollout_table(table.slice(2, 1), d / "01.feather")
    (d / "dataset_info.json").write_text("{}")
    got = canonical(d)
    assert got.equals(canonical(write_rollout_table(table, tmp_path / "all.arrow")))
    offsets = [(sb.path.rsplit("/", 1)[-1], sb.row_offset, sb.global_offset)
               for sb in open_rollouts(d).iter_batches()]
    assert offsets == [("00.arrow", 0, 0), ("01.feather", 0, 2), ("02.parquet", 0, 3)]


def test_remapped_columns_read_as_the_canonical_table(tmp_path):
    table = valid_rollout_table().rename_columns(
        ["prompt", "completion", "logprobs", "loss_mask", "reward", "uid", "sample_id", "policy_version"])
    path = write_rollout_table(table, tmp_path / "other.arrow")
    mapping = parse_column_map(["prompt=prompt_ids", "completion=response_ids", " logprobs = behavior_logprobs",
                                "uid=group_id"])
    assert canonical(path, mapping).equals(canonical(write_rollout_table(valid_rollout_table(), tmp_path / "c.arrow")))


def test_remapped_column_takes_precedence(tmp_path):
    # A file with a stale 'behavior_logprobs' and the right log-probs under 'sampler_logprobs'.
    right = [[-1.0, -1.0, -1.0], [-1.0], [-1.0, -1.0], [-1.0, -1.0]]
    table = valid_rollout_table().append_column("sampler_logprobs", pa.array(right, pa.list_(pa.float32())))
    path = write_rollout_table(table, tmp_path / "two.arrow")
    got = canonical(path, {"sampler_logprobs": "behavior_logprobs"})
    assert got.column("behavior_logprobs").to_pylist() == right


def test_parse_column_map_rejects_bad_items():
    with pytest.raises(ConfigError, match="LOGGED=CANONICAL"):
        parse_column_map(["logprobs"])
    with pytest.raises(ConfigError, match="not a schema v1 column"):
        parse_column_map(["logprobs=logits"])


def test_source_metadata_is_the_drpo_keys_every_file_agrees_on(tmp_path):
    a = write_rollout_table(valid_rollout_table(), tmp_path / "a.arrow",
                            metadata={"drpo.temperature": "0.7", "drpo.top_p": "0.9", "other": "x"})
    b = write_rollout_table(valid_rollout_table(), tmp_path / "b.arrow",
                            metadata={"drpo.temperature": "0.7", "drpo.top_p": "1.0"})
    assert open_rollouts(a).metadata == {"drpo.temperature": "0.7", "drpo.top_p": "0.9"}
    assert open_rollouts([a, b]).metadata == {"drpo.temperature": "0.7"}  # only what all files agree on
    assert open_rollouts([a, b]).files[1].metadata["drpo.top_p"] == "1.0"


def test_large_batches_are_sliced_and_rows_numbered_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "BATCH_ROWS", 3)
    table = pa.concat_tables([valid_rollout_table()] * 3)  # 12 rows, written as one record batch
    lp = table.column("behavior_logprobs").to_pylist()
    lp[10] = [-3.0, 0.25]  # row 10 sits in the 4th slice
    table = table.set_column(2, "behavior_logprobs", pa.array(lp, pa.list_(pa.float32())))
    table = table.set_column(6, "sample_id", pa.array([f"s{i}" for i in range(12)]))
    path = write_rollout_table(table.combine_chunks(), tmp_path / "big.arrow", fmt="stream")
    source = open_rollouts(path)
    assert [sb.batch.num_rows for sb in source.iter_batches()] == [3, 3, 3, 3]
    problems = validate_rollouts(source)
    assert [(p.column, p.row, p.sample_id, p.found) for p in problems] == [
        ("behavior_logprobs", 10, "s10", "0.25 at token 1")]


def test_batches_are_sliced_by_list_values_too_and_a_long_row_is_a_slice_of_its_own(tmp_path, monkeypatch):
    # Issue 32, point 13: the memory of a slice is bounded by its tokens, not its rows.
    monkeypatch.setattr(files, "BATCH_VALUES", 10)
    lengths = [1, 2, 3, 12, 1, 1, 2]  # response tokens per row; 3 per-token columns hold 3 values per token
    rows = [{"prompt_ids": [1], "response_ids": [5] * n, "behavior_logprobs": [-0.5] * n,
             "loss_mask": [True] * n, "advantage": 1.0, "sample_id": f"s{i}"} for i, n in enumerate(lengths)]
    rows[6]["behavior_logprobs"] = [-0.5, 0.25]
    path = write_rollout_table(pa.Table.from_pylist(rows), tmp_path / "one.arrow")  # one record batch
    source = open_rollouts(path)
    sizes = [[len(r) for r in sb.batch.column("response_ids").to_pylist()] for sb in source.iter_batches()]
    # values per row: 1 prompt + 3 per response token → 4, 7, 10, 37, 4, 4, 7
    assert sizes == [[1], [2], [3], [12], [1, 1], [2]]
    assert [sb.row_offset for sb in source.iter_batches()] == [0, 1, 2, 3, 4, 6]
    problems = validate_rollouts(source)
    assert [(p.row, p.sample_id, p.found) for p in problems] == [(6, "s6", "0.25 at token 1")]


def test_list_values_counts_the_innermost_values_of_each_row_from_offsets():
    nested = pa.array([[[1, 2], [3]], [], None, [[4, 5, 6]]], pa.list_(pa.list_(pa.int16())))
    assert files.list_values(nested).tolist() == [3, 0, 0, 3]
    assert files.list_values(nested.slice(1, 3)).tolist() == [0, 0, 3]
    fixed = pa.array([[1, 2], [3, 4], [5, 6]], pa.list_(pa.int8(), 2))
    assert files.list_values(fixed.slice(1)).tolist() == [2, 2]
    assert files.list_values(pa.array([1.0, 2.0])).tolist() == [0, 0]


def test_casting_a_slice_of_a_huge_batch_casts_only_its_rows():
    # Arrow casts a sliced list array's child from its start: every later slice would cost more.
    values = pa.array(np.arange(30, dtype=np.int32))
    arr = pa.ListArray.from_arrays(pa.array([0, 10, 20, 30], pa.int32()), values)
    nested = pa.array([[[1], [2, 3]], None, [[4, 5]], [[6]]], pa.list_(pa.list_(pa.int32())))
    for column, target in ((arr, pa.list_(pa.int64())), (nested, pa.list_(pa.list_(pa.int16())))):
        part = column.slice(2, 2)
        own = files._own_values(part)
        assert own.equals(part) and own.offsets[0].as_py() == 0
        cast = own.cast(target)
        assert cast.equals(part.cast(target)) and len(cast.flatten()) == len(part.flatten())


def test_iter_batches_projects_columns(valid_rollout_path):
    batches = list(open_rollouts(valid_rollout_path).iter_batches(columns=["reward", "group_id"]))
    assert batches[0].batch.schema.names == ["reward", "group_id"]


def test_open_rollouts_strict_raises_and_lenient_records(tmp_path, valid_rollout_path):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(InputError, match="junk.parquet"):
        open_rollouts([valid_rollout_path, junk])
    source = open_rollouts([valid_rollout_path, junk], strict=False)
    assert [p.kind for p in source.problems] == ["unreadable"] and len(source.files) == 1
    with pytest.raises(InputError):
        next(source.iter_batches())


def test_truncated_stream_raises_naming_the_file_while_streaming(tmp_path):
    table = pa.concat_tables([valid_rollout_table()] * 20)
    path = write_rollout_table(table, tmp_path / "s.arrow", fmt="stream", max_chunksize=4)
    path.write_bytes(path.read_bytes()[:-300])
    source = open_rollouts(path)  # the schema message is intact
    with pytest.raises(InputError, match="truncated or corrupt"):
        for _ in source.iter_batches():
            pass


def test_problem_renders_as_one_line():
    p = Problem("logprob", "r.arrow", "behavior_logprobs", 7, "finite log-probs <= 0", "nan at token 2", "abc")
    assert str(p) == "r.arrow, column 'behavior_logprobs', row 7 (sample_id 'abc'): " \
                     "expected finite log-probs <= 0, found nan at token 2"
    assert str(Problem("unreadable", "x.bin", None, None, "an Arrow file", "other content")) == \
        "x.bin: expected an Arrow file, found other content"


def test_string_hash_is_a_function_of_the_string_only():
    arr = pa.array(["a", "b", "a", "", "ab", "ba", "x" * 300, "é"])
    h = hash_strings(arr)
    assert h[0] == h[2] and len(set(h.tolist())) == 7
    # Same strings inside a sliced, differently-offset array hash the same.
    assert hash_strings(pa.array(["zz", "ab", "é"]).slice(1)).tolist() == [h[4], h[7]]
    rng = np.random.default_rng(0)
    ids = pa.array([f"sample-{i}" for i in rng.permutation(20000)])
    assert len(np.unique(hash_strings(ids))) == 20000
