"""The pieces of the llama.cpp loop that need no engine: HF -> GGUF tensors (names, q/k permutation,
types, metadata copy), the task's reward rule. The engine round trip is in test_engine_loop_real.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from toy import tiny_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "examples" / "real"))
import gguf
import realtask
import to_gguf


def test_permute_is_the_inverse_of_transformers_unpermute():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    rng = np.random.default_rng(0)
    q = rng.standard_normal((4 * 8, 32)).astype(np.float32)  # 4 heads of dim 8
    k = rng.standard_normal((2 * 8, 32)).astype(np.float32)  # 2 kv heads
    pq, pk = to_gguf.permute(q, 4, 4), to_gguf.permute(k, 4, 2)
    assert not np.array_equal(pq, q)
    np.testing.assert_array_equal(proc.process(pq, "blk.0.attn_q.weight").weights, q)
    np.testing.assert_array_equal(proc.process(pk, "blk.0.attn_k.weight").weights, k)
    # one head by hand: rows (0, 1, 2, 3, 4, 5, 6, 7) -> halves interleaved (0, 4, 1, 5, 2, 6, 3, 7)
    one = np.arange(8, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(to_gguf.permute(one, 1)[:, 0], [0, 4, 1, 5, 2, 6, 3, 7])


def test_gguf_names():
    assert to_gguf.gguf_name("model.embed_tokens.weight", 2) == "token_embd.weight"
    assert to_gguf.gguf_name("model.layers.1.self_attn.o_proj.weight", 2) == "blk.1.attn_output.weight"
    assert to_gguf.gguf_name("model.layers.0.mlp.down_proj.weight", 2) == "blk.0.ffn_down.weight"
    assert to_gguf.gguf_name("model.layers.0.post_attention_layernorm.weight", 2) == "blk.0.ffn_norm.weight"
    assert to_gguf.gguf_name("model.norm.weight", 2) == "output_norm.weight"
    with pytest.raises(SystemExit, match="no GGUF name"):
        to_gguf.gguf_name("model.layers.0.mystery.weight", 2)


def tiny_llama(tmp_path: Path) -> Path:
    from transformers import LlamaConfig

    model = tiny_model(LlamaConfig, vocab_size=64, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    return tmp_path / "model"


def template(tmp_path: Path) -> Path:
    path = tmp_path / "template.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(2)
    w.add_file_type(3)
    w.add_token_list(["<a>", "<b>", "c"])
    w.add_chat_template("{{ x }}")
    w.add_tensor("token_embd.weight", np.zeros((3, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kind", ["F32", "F16", "Q8_0"])
def test_export_writes_every_weight_with_metadata_of_the_template(tmp_path, kind):
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    model = tiny_llama(tmp_path)
    out = to_gguf.export(model, tmp_path / f"m.{kind}.gguf", kind, template(tmp_path))
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.file_type"].contents() == to_gguf.FILE_TYPES[kind]
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["<a>", "<b>", "c"]
    assert r.fields["tokenizer.chat_template"].contents() == "{{ x }}"
    state = load_file(str(model / "model.safetensors"))
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == len([k for k in state if k != "lm_head.weight"])  # tied head not written
    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    tol = {"F32": 0.0, "F16": 1e-3, "Q8_0": 2e-2}[kind]
    for hf_name, w in state.items():
        if hf_name == "lm_head.weight":
            continue
        t = tensors[to_gguf.gguf_name(hf_name, 2)]
        want = gguf.GGMLQuantizationType.F32 if w.ndim == 1 else gguf.GGMLQuantizationType[kind]
        assert t.tensor_type == want, hf_name
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        back = proc.process(back, t.name).weights  # transformers' un-permute on load
        scale = float(w.abs().max())
        assert np.abs(back - w.numpy()).max() <= tol * scale, hf_name


def test_export_refuses_an_unknown_type(tmp_path):
    with pytest.raises(SystemExit, match="Q4_1"):
        to_gguf.export(tmp_path, tmp_path / "x.gguf", "Q4_1")


def test_requantizing_a_small_update_to_q4_1_changes_few_blocks():
    torch.manual_seed(0)
    w = {"a.weight": torch.randn(64, 256) * 0.05}
    small = {"a.weight": w["a.weight"] + 1e-5 * torch.randn(64, 256)}
    q4 = to_gguf.measure_requant(w, small, "Q4_1")
    q8 = to_gguf.measure_requant(w, small, "Q8_0")
    assert q4 < q8
    assert to_gguf.measure_requant(w, w, "Q8_0") == 0.0


@pytest.mark.parametrize(("text", "problem", "want"), [
    ("7", (3, 4), 1.0), ("3 + 4 = 7", (3, 4), 1.0), ("The answer is 7.", (3, 4), 1.0),
    ("3 + 4 = 8, no, 7", (3, 4), 0.0), ("Hello", (3, 4), 0.0), ("6", (3, 3), 1.0), ("3 + 3 = 6", (3, 3), 1.0),
])
def test_score_first(text, problem, want):
    assert realtask.score_first(text, problem) == want
