"""checkpoint.py: safe loading, policy versions, atomic saves that from_pretrained loads back."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from drpo_cli.base.errors import CheckpointError, ConfigError, DrpoError
from drpo_cli.model import checkpoint
from drpo_cli.model.checkpoint import (
    CheckpointWriter,
    default_out_dir,
    load_model,
    parse_size,
    read_policy_version,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import toytask


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A model directory like a user's: weights, config, tokenizer, generation config, version 7."""
    src = tmp_path_factory.mktemp("src") / "ckpt"
    toytask.build_model(seed=1).save_pretrained(src)
    toytask.build_tokenizer().save_pretrained(src)
    (src / "drpo_checkpoint.json").write_text(json.dumps({"policy_version": 7, "training": {}}))
    return src


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def trained(source: Path) -> torch.nn.Module:
    """The source model with every weight changed, as after a training run."""
    model, _ = load_model(source)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    return model


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---- save -> from_pretrained ---------------------------------------------------------------------


def test_save_roundtrip_ties_and_copies(source, tmp_path):
    before = tree_digest(source)
    model = trained(source)
    out = save_checkpoint(
        model,
        source_dir=source,
        out_dir=tmp_path / "out",
        policy_version=8,
        training_config={"lr": 1e-3},
        extra_files={"drpo_report.json": "{}\n"},
    )
    assert out == tmp_path / "out"
    assert (out / "drpo_report.json").read_text() == "{}\n"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert_same_weights(model, loaded)
    # The tied head is stored once (under the embedding's name) and ties again on load.
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    meta = json.loads((out / "drpo_checkpoint.json").read_text())
    assert meta["policy_version"] == 8 and meta["training"] == {"lr": 1e-3}
    assert meta["source"]["policy_version"] == 7
    assert tree_digest(source) == before  # the input checkpoint is only read
    assert leftovers(tmp_path) == []
    _, info = load_model(out)
    assert info.policy_version == 8 and info.vocab_size == len(toytask.VOCAB)


def test_sharded_save_writes_index(source, tmp_path):
    model = trained(source)
    # 50 kB shards: the (21 x 64) embedding and each (64 x 128) MLP matrix (32,768 B) force several files.
    out = save_checkpoint(
        model,
        source_dir=source,
        out_dir=tmp_path / "out",
        policy_version=8,
        training_config={},
        max_shard_size="50KB",
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    # Every parameter once (the tied head excluded), 4 bytes each in float32.
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == 4 * sum(v.numel() for v in expected.values())
    for name in shards:
        with safe_open(out / name, "pt") as f:
            sizes = [f.get_tensor(k).numel() * 4 for k in f.keys()]  # noqa: SIM118 - safe_open is not iterable
        # A shard only exceeds the threshold when it holds a single tensor larger than it.
        assert sum(sizes) <= 50_000 or len(sizes) == 1
    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(out))


def test_state_dict_path_untied_copy_and_source_config(source, tmp_path):
    """A gathered state dict (e.g. from FSDP shards) has the head as a separate tensor; it is still written once."""
    model = trained(source)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert state["lm_head.weight"].data_ptr() != state["model.embed_tokens.weight"].data_ptr()
    out = save_checkpoint(
        state, source_dir=source, out_dir=tmp_path / "out", policy_version=3, training_config={}
    )
    assert json.loads((out / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert_same_weights(model, loaded)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_streaming_writer_and_save_dtype(source, tmp_path):
    model = trained(source)
    with CheckpointWriter(
        tmp_path / "out", source_dir=source, policy_version=1, training_config={}, dtype="bfloat16"
    ) as writer:
        for name, tensor in model.state_dict().items():
            if name != "lm_head.weight":
                writer.add(name, tensor)
        out = writer.commit()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded, _ = load_model(out, dtype="bfloat16")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)), k


def test_writer_files_read_back_as_safetensors_own_with_every_tensor_aligned(source, tmp_path):
    # Mixed element sizes, odd counts (a 3-element bf16 tensor would misalign a following fp32 one),
    # 0-dim and empty tensors, across two shards: what safetensors' own reader gives back.
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a.bf16": torch.randn(3, generator=g).to(torch.bfloat16), "b.f32": torch.randn(5, 7, generator=g),
               "c.i64": torch.arange(3), "d.bool": torch.tensor([True, False, True]), "e.scalar": torch.tensor(2.5),
               "f.empty": torch.zeros(0, 4), "g.u8": torch.arange(5, dtype=torch.uint8),
               "h.f16": torch.randn(2, 3, generator=g).half(), "i.f32": torch.randn(9, generator=g)[::2]}
    with CheckpointWriter(tmp_path / "out", source_dir=source, policy_version=1, training_config={},
                          max_shard_size=120) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
        out = writer.commit()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and sorted(p.name for p in out.iterdir() if "scratch" in p.name) == []
    loaded = {}
    for name in files:
        loaded |= load_file(str(out / name))
        header = checkpoint.safetensors_header(out / name)
        for key, entry in header.items():
            assert entry.offset % max(tensors[key].element_size(), 1) == 0, key  # aligned in the file
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name


# ---- atomicity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["second_shard", "copy_tokenizer", "final_rename"])
def test_failure_mid_write_leaves_nothing(source, tmp_path, monkeypatch, stage):
    model = trained(source)
    if stage == "second_shard":
        real, calls = CheckpointWriter._flush, []

        def flush(self):
            calls.append(1)
            if len(calls) == 2:
                raise OSError("disk full")
            real(self)

        monkeypatch.setattr(CheckpointWriter, "_flush", flush)
    elif stage == "copy_tokenizer":
        monkeypatch.setattr(
            checkpoint.shutil, "copyfile", lambda *a: (_ for _ in ()).throw(OSError("disk full"))
        )
    else:
        real_rename = os.rename

        def rename(a, b):
            if Path(b) == tmp_path / "out":
                raise OSError("rename failed")
            real_rename(a, b)

        monkeypatch.setattr(checkpoint.os, "rename", rename)
    # A failure of the writer's own files is named by path (DrpoError); an injected one passes through.
    with pytest.raises((OSError, DrpoError)):
        save_checkpoint(
            model,
            source_dir=source,
            out_dir=tmp_path / "out",
            policy_version=8,
            training_config={},
            max_shard_size="50KB",
        )
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []  # the temporary directory is removed too


def test_killed_writer_leaves_no_out_dir(source, tmp_path):
    """SIGKILL in the middle of writing shards: `out` never appears (only a hidden temp sibling)."""
    script = textwrap.dedent(f"""
        import time, torch
        from drpo_cli.model.checkpoint import CheckpointWriter, load_model, save_checkpoint
        real = CheckpointWriter._flush
        def slow(self):
            real(self)
            print("flushed", flush=True)
            time.sleep(60)
        CheckpointWriter._flush = slow
        model, _ = load_model({str(source)!r})
        save_checkpoint(model, source_dir={str(source)!r}, out_dir={str(tmp_path / "out")!r},
                        policy_version=8, training_config={{}}, max_shard_size="50KB")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: more threads only contend
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "flushed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (tmp_path / "out").exists()
    assert [p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()] == [True]


def test_existing_out_dir_refused_then_replaced_with_overwrite_only_when_drpo_wrote_it(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    model = trained(source)
    for overwrite, message in ((False, "already exists \\(pass --overwrite"),
                               (True, "holds 1 file drpo did not write: keep.txt")):
        with pytest.raises(ConfigError, match=message):
            save_checkpoint(model, source_dir=source, out_dir=out, policy_version=8, training_config={},
                            overwrite=overwrite)
        assert (out / "keep.txt").read_text() == "old" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
        assert leftovers(tmp_path) == []
    (out / "keep.txt").unlink()  # empty: holds nothing, so it may be replaced
    save_checkpoint(model, source_dir=source, out_dir=out, policy_version=7, training_config={}, overwrite=True)
    save_checkpoint(model, source_dir=source, out_dir=out, policy_version=8, training_config={}, overwrite=True)
    assert json.loads((out / "drpo_checkpoint.json").read_text())["policy_version"] == 8
    assert leftovers(tmp_path) == []  # the old directory set aside is deleted


@pytest.mark.parametrize("relative", [".", "sub"])
def test_out_dir_inside_source_refused(source, relative):
    before = tree_digest(source)
    with pytest.raises(ConfigError, match="is( inside)? the input source"):
        save_checkpoint(
            {},
            source_dir=source,
            out_dir=source / relative,
            policy_version=8,
            training_config={},
            overwrite=True,
        )
    assert tree_digest(source) == before


# ---- naming, versions, sizes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_dir", "version", "expected"),
    [
        ("runs/ckpt", 7, "runs/ckpt-v8"),
        ("runs/ckpt/", 7, "runs/ckpt-v8"),
        ("runs/ckpt-v8", 8, "runs/ckpt-v9"),
        ("runs/ckpt-v8/", 12, "runs/ckpt-v13"),
        ("runs/ckpt", None, "runs/ckpt-v1"),
        ("runs/model-v2b", 2, "runs/model-v2b-v3"),
    ],
)
def test_default_out_dir(model_dir, version, expected):
    assert default_out_dir(model_dir, version) == Path(os.path.abspath(expected))


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("1GiB") == 2**30
    assert parse_size("10kb") == 10_000
    assert parse_size(123) == 123
    with pytest.raises(ConfigError, match="invalid shard size"):
        parse_size("lots")


def test_read_policy_version(tmp_path):
    assert read_policy_version(tmp_path) is None
    (tmp_path / "drpo_checkpoint.json").write_text('{"policy_version": 4}')
    assert read_policy_version(tmp_path) == 4
    for bad in ('{"policy_version": -1}', '{"policy_version": "4"}', '{"version": 4}', "{not json"):
        (tmp_path / "drpo_checkpoint.json").write_text(bad)
        with pytest.raises(CheckpointError) as err:
            read_policy_version(tmp_path)
        assert "drpo_checkpoint.json" in err.value.message and "\n" not in err.value.message


# ---- load errors ------------------------------------------------------------------------------------


def copy_dir(source: Path, dest: Path, skip: tuple[str, ...] = ()) -> Path:
    dest.mkdir()
    for p in source.iterdir():
        if p.name not in skip:
            (dest / p.name).write_bytes(p.read_bytes())
    return dest


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_each_unloadable_model_directory_is_named_in_one_line(source, tmp_path):
    cases = {}
    cases["not found"] = (tmp_path / "missing", {})
    (tmp_path / "file").write_text("x")
    cases["not a directory"] = (tmp_path / "file", {})
    cases["no config.json"] = (copy_dir(source, tmp_path / "noconf", skip=("config.json",)), {})
    bin_only = copy_dir(source, tmp_path / "binonly", skip=("model.safetensors",))
    torch.save(load_model(source)[0].state_dict(), bin_only / "pytorch_model.bin")
    cases["only pytorch_model.bin (pickle) found: pass --allow-unsafe-weights"] = (bin_only, {})
    cases["no weights found"] = (copy_dir(source, tmp_path / "noweights", skip=("model.safetensors",)), {})
    remote = copy_dir(source, tmp_path / "remote")
    edit_config(remote, model_type="my_lm", auto_map={"AutoModelForCausalLM": "modeling_my.MyLM"})
    cases["needs remote code"] = (remote, {})
    unknown = copy_dir(source, tmp_path / "unknown")
    edit_config(unknown, model_type="not_a_model")
    cases["unknown model type"] = (unknown, {})
    encoder = copy_dir(source, tmp_path / "encoder")
    edit_config(encoder, model_type="vit")
    cases["no causal-LM head"] = (encoder, {})
    cases["unsupported dtype 'float64'"] = (source, {"dtype": "float64"})
    partial = copy_dir(source, tmp_path / "partial", skip=("model.safetensors",))
    state = {k: v for k, v in load_model(source)[0].state_dict().items() if "layers.1.mlp" not in k}
    save_checkpoint(state, source_dir=source, out_dir=partial / "w", policy_version=0, training_config={})
    os.rename(partial / "w" / "model.safetensors", partial / "model.safetensors")
    cases["weights missing from the checkpoint: model.layers.1.mlp"] = (partial, {})
    for expected, (path, kwargs) in cases.items():
        with pytest.raises(CheckpointError) as err:
            load_model(path, **kwargs)
        assert expected in err.value.message, (expected, err.value.message)
        assert "\n" not in err.value.message
    # With the explicit opt-in the pickle weights load (torch.load with weights_only=True).
    model, _ = load_model(bin_only, allow_unsafe=True)
    assert_same_weights(model, load_model(source)[0])


def test_load_dtypes_and_device(source):
    model, info = load_model(source, dtype="auto")  # CPU: auto means float32
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert info.config.model_type == "llama" and info.policy_version == 7
    model, _ = load_model(source, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_model(source, device="cuda")
