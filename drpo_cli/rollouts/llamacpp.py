"""llama.cpp in: a sampler over llama-cpp-python's `Llama`, and llama-server `/completion` responses.

Why neither of llama.cpp's own ways out is usable as is:
- llama-cpp-python's `create_completion(logprobs=...)` reports raw log-probs (a plain log-softmax
  of the logits, before its sampler chain penalties -> top_k -> typical -> top_p -> min_p -> temp)
  and drops the end-of-sequence token; its OpenAI-compatible server gives token strings, not ids.
- llama-server's `/completion` is usable, with the right request (see `llamacpp_server_rows`).

`llamacpp_sample` draws every token itself from the distribution it logs: the engine evaluates the
model (its KV cache, its logits), numpy turns one logits row into the sampling distribution with
llama.cpp's truncation chain in llama.cpp's order, draws the token from it and records that exact
log-prob. μ is right by construction, EOS included.

Field names and semantics follow llama.cpp commit 0c1e57098 (vendored by llama-cpp-python 0.3.36):
tools/server/server-task.cpp (`probs_vector_to_json`, `to_json_non_oaicompat`,
`task_params::to_json`), tools/server/server-context.cpp (`process_token`, `populate_token_probs`,
`send_final_response`, `send_partial_response`), src/llama-sampler.cpp (the samplers reproduced below).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from drpo_cli.base.errors import ConfigError, InputError
from drpo_cli.rollouts.adapters import Row, Text, as_logprob, as_token_ids, bad
from drpo_cli.rollouts.adapters.streams import Streams, assemble, event_object, fragment

# ---- the truncation chain of llama.cpp (src/llama-sampler.cpp), on one logits row --------------------


def processed_logprobs(logits: np.ndarray, *, temperature: float = 1.0, top_k: int = 0, typical_p: float = 1.0,
                       top_p: float = 1.0, min_p: float = 0.0, min_keep: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(kept token ids, their log-probs) of the distribution llama.cpp samples from.

    llama.cpp's chain (common_params_sampling.samplers; llama-cpp-python's `_init_sampler`) applies
    top_k, typical, top_p, min_p to the *untempered* logits and divides by the temperature last,
    then `dist` draws from softmax over what is left. So, unlike transformers (temperature first),
    top-p and min-p see the T = 1 distribution. Each step follows its C++ function:
    - top_k (`llama_sampler_top_k_impl`): k <= 0 keeps all, else the k largest logits.
    - typical (`llama_sampler_typical_apply`): p >= 1 off; softmax, entropy H, candidates ordered by
      |−log p − H| (stable), keep until the running sum is > p and at least min_keep are kept.
    - top_p (`llama_sampler_top_p_apply`): p >= 1 off; softmax, descending, keep until the running
      sum is >= p and at least min_keep are kept.
    - min_p (`llama_sampler_min_p_apply`): p <= 0 off; keep logits >= max + log(p).
    - temp (`llama_sampler_temp_impl`): logits / T; then softmax over the kept tokens.
    Penalties, DRY, XTC and mirostat are not offered: they are not part of a policy being trained.
    """
    ids = np.arange(logits.shape[0])  # (V,)
    x = logits.astype(np.float64, copy=False)  # (V,)
    if 0 < top_k < x.shape[0]:
        part = np.argpartition(-x, top_k - 1)[:top_k]
        ids, x = ids[part], x[part]
    if typical_p < 1.0:
        p = _softmax(x)
        logp = np.log(p, where=p > 0, out=np.full_like(p, -np.inf))
        entropy = -np.sum(p[p > 0] * logp[p > 0])
        order = np.argsort(np.abs(-logp - entropy), kind="stable")
        ids, x = _keep_prefix(ids[order], x[order], p[order], typical_p, min_keep, strict=True)
    if top_p < 1.0:
        p = _softmax(x)
        # As llama.cpp: sort only the 256 largest first; sort everything when they do not reach top_p.
        order = np.argpartition(-x, 255)[:256] if len(x) > 1024 else np.arange(len(x))
        order = order[np.argsort(-x[order], kind="stable")]
        cum = np.cumsum(p[order])
        if len(order) < len(x) and not (cum[min_keep - 1:] >= top_p).any():
            order = np.argsort(-x, kind="stable")
        ids, x = _keep_prefix(ids[order], x[order], p[order], top_p, min_keep, strict=False)
    if min_p > 0.0:
        keep = x >= x.max() + math.log(min_p)
        if keep.sum() >= min_keep:
            ids, x = ids[keep], x[keep]
    z = x / temperature
    z = z - z.max()
    return ids, z - math.log(np.exp(z).sum())


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _keep_prefix(ids: np.ndarray, x: np.ndarray, p: np.ndarray, threshold: float, min_keep: int,
                 strict: bool) -> tuple[np.ndarray, np.ndarray]:
    """The shortest prefix whose probability sum passes `threshold` (> if strict, else >=), >= min_keep long."""
    cum = np.cumsum(p)
    passed = (cum > threshold) if strict else (cum >= threshold)
    passed &= np.arange(1, len(p) + 1) >= min_keep
    n = int(np.argmax(passed)) + 1 if passed.any() else len(p)
    return ids[:n], x[:n]


# ---- llama-cpp-python: the sampler ------------------------------------------------------------------


def llamacpp_sample(llm: Any, prompts: Iterable[Sequence[int]], *, n: int = 1, temperature: float = 1.0,
                    top_k: int = 0, typical_p: float = 1.0, top_p: float = 1.0, min_p: float = 0.0,
                    max_tokens: int = 256, seed: int | None = None,
                    eos: int | Iterable[int] | None = None) -> Iterator[Row]:
    """Sample n responses per prompt with a llama-cpp-python `Llama`, logging each token's processed log-prob.

    `prompts`: token-id lists (e.g. `llm.tokenize(text.encode(), special=True)`). For each token the
    engine's last logits row is turned into llama.cpp's sampling distribution (`processed_logprobs`:
    top_k, typical, top_p, min_p on the untempered logits, then softmax at `temperature`), the token
    is drawn from exactly that distribution and its log-prob recorded, so `behavior_logprobs` is μ
    by construction. The defaults (T = 1, no truncation) sample the model's full distribution, the
    one drpo trains; llama.cpp's own defaults (top_k 40, top_p 0.95, min_p 0.05, T 0.8) are not
    applied. A row ends with its EOS token (recorded, with its log-prob) or at `max_tokens`.
    `eos`: the end token id(s); default every end-of-generation token of the vocabulary
    (`llama_vocab_is_eog`, where llama.cpp itself stops: EOS, EOT, a chat model's end of turn).

    The prompt is evaluated once and its KV cache reused by the n samples (the cache is cut back to
    the prompt between samples) and by the next prompt's common prefix. group_id: the prompt's
    index; sample_id "prompt/sample". Recurrent models (no cache truncation) are refused.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature: expected a finite number > 0, found {temperature}")
    if n < 1 or max_tokens < 1:
        raise ConfigError(f"n and max_tokens: expected integers >= 1, found n={n}, max_tokens={max_tokens}")
    if llm._is_recurrent or llm._is_hybrid:
        raise ConfigError("llamacpp_sample: a recurrent model cannot cut its cache back to the prompt; "
                          "use a transformer model")
    ends = _end_tokens(llm) if eos is None else {eos} if isinstance(eos, int) else set(eos)
    rng = np.random.default_rng(seed)
    chain = {"temperature": temperature, "top_k": top_k, "typical_p": typical_p, "top_p": top_p, "min_p": min_p}
    for p, prompt in enumerate(prompts):
        prompt = as_token_ids(prompt, f"prompts[{p}]")
        if not prompt:
            raise InputError(f"prompts[{p}]: expected at least one token, found an empty list")
        if len(prompt) + max_tokens > llm.n_ctx():
            raise ConfigError(f"prompts[{p}]: {len(prompt)} tokens + max_tokens {max_tokens} exceed the "
                              f"context of {llm.n_ctx()} tokens (Llama(n_ctx=...))")
        # Keep the cached prefix shared with the previous prompt (at least one token is evaluated,
        # so the context holds the last prompt position's logits).
        cached = llm.input_ids[: llm.n_tokens]
        same = np.asarray(cached[: len(prompt)]) == np.asarray(prompt[: len(cached)])
        keep = min(int(np.argmin(same)) if not same.all() else len(same), len(prompt) - 1)
        llm.n_tokens = keep  # eval() drops the cache entries from n_tokens on
        llm.eval(prompt[keep:])
        first = _last_logits(llm).copy()  # (V,)
        for s in range(n):
            llm.n_tokens = len(prompt)
            logits, tokens, values = first, [], []
            while True:
                ids, logp = processed_logprobs(logits, **chain)  # (K,), (K,)
                cum = np.cumsum(np.exp(logp))  # inverse-CDF draw from exactly these probabilities
                k = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(ids) - 1)
                tokens.append(int(ids[k]))
                values.append(float(logp[k]))
                if tokens[-1] in ends or len(tokens) == max_tokens:
                    break
                llm.eval([tokens[-1]])
                logits = _last_logits(llm)
            yield {"prompt_ids": prompt, "response_ids": tokens, "behavior_logprobs": values,
                   "group_id": str(p), "sample_id": f"{p}/{s}"}


def _end_tokens(llm: Any) -> set[int]:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return {t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}


def _last_logits(llm: Any) -> np.ndarray:
    """The logits row of the last evaluated position, (V,) float32, a view into the engine's buffer."""
    if llm._logits_all:  # Llama(logits_all=True) copies every row into llm.scores
        return llm.scores[llm.n_tokens - 1]
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


# ---- llama-server /completion -------------------------------------------------------------------------

# Pre-sampling log-probs (softmax of the raw logits, T = 1, whole vocabulary) are those of the
# sampled distribution only when every sampler in the chain is the identity: (setting, sampler in
# generation_settings.samplers, identity test, identity value). common_params_sampling's defaults
# (top_k 40, top_p 0.95, min_p 0.05, temperature 0.8) are not.
_IDENTITY = [("temperature", "temperature", lambda v: v == 1.0, "1"), ("top_k", "top_k", lambda v: v <= 0, "0"),
             ("top_p", "top_p", lambda v: v >= 1.0, "1"), ("min_p", "min_p", lambda v: v <= 0.0, "0"),
             ("typical_p", "typ_p", lambda v: v >= 1.0, "1"), ("top_n_sigma", "top_n_sigma", lambda v: v <= 0.0, "-1"),
             ("repeat_penalty", "penalties", lambda v: v == 1.0, "1"),
             ("presence_penalty", "penalties", lambda v: v == 0.0, "0"),
             ("frequency_penalty", "penalties", lambda v: v == 0.0, "0"),
             ("dry_multiplier", "dry", lambda v: v == 0.0, "0")]
# common_params_sampling.samplers, named as common_sampler_type_to_str does.
_DEFAULT_SAMPLERS = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")
_ROW_FIELDS = ("reward", "advantage", "group_id", "sample_id", "policy_version")
_FIX = "request post_sampling_probs: true (the probabilities after the sampler chain)"


def llamacpp_server_rows(response: Any, prompt_ids: Sequence[int] | Sequence[Sequence[int]] | None = None, *,
                         request_id: str | None = None) -> Iterator[Row]:
    """Rows from llama-server `/completion` responses (one result, or the array of several).

    Request: `{"prompt": ids, "n_probs": 1, "post_sampling_probs": true, "return_tokens": true,
    "temperature": T, ...}` (`"n_cmpl": k` for k samples per prompt). Then `tokens` holds the sampled
    ids, EOS included when `stop_type` is "eos" (process_token appends every sampled token, the end
    token too), and `completion_probabilities[t].prob` the sampled token's probability after the
    whole sampler chain (populate_token_probs, post_sampling): μ itself; the row logs its log.

    Refused, each with its fix: no `tokens` (return_tokens), no probabilities (n_probs >= 1),
    pre-sampling `logprob`s unless every sampler is the identity (T 1, top_k 0, top_p 1, min_p 0,
    typical 1, no penalties), a grammar (rejection sampling: the logged candidates ignore it), XTC
    or mirostat (the logged distribution is not the one drawn from), speculative decoding (accepted
    draft tokens carry a placeholder probability 1), backend sampling, and tokens the server left
    without a probability (it skips tokens that end inside a UTF-8 character). With stop_type
    "word" the server cuts the stop string's tokens from the probabilities; the row ends before them.

    Prompt ids: `prompt_ids` (one list for every result, or one list per prompt; an array of
    P prompts × k samples comes back in that order), else the result's own `prompt_ids` field (as
    `drpo convert` lines carry them); checked against `tokens_evaluated`. group_id: `request_id`
    (with "/p" when there are several prompts), else a hash of the prompt ids. Each row records its
    `temperature`; `reward`, `advantage`, `group_id`, `sample_id`, `policy_version` fields added
    next to a result are copied into its row.
    """
    results = list(response) if isinstance(response, list) else [response]
    if not results:
        raise bad("(response)", "a /completion result or a non-empty array of them", Text("an empty array"))
    prompts = _prompts(prompt_ids, results)
    per_prompt = len(results) // len(prompts)
    for i, result in enumerate(results):
        where = f"[{i}]." if isinstance(response, list) else ""
        if not isinstance(result, Mapping):
            raise bad(f"{where or '(response)'}", "a /completion result object", Text(type(result).__name__))
        if result.get("stop") is False:
            raise fragment(f"{where}stop", "a finished result (true)", "false",
                           'the event of one token of a streamed answer ("stream": true)')
        prompt = prompts[i // per_prompt] if prompts[0] is not None else result.get("prompt_ids")
        if prompt is None:
            raise bad(f"{where}prompt_ids", "the prompt ids sent (pass prompt_ids, or add a prompt_ids field)", None)
        prompt = as_token_ids(prompt, f"{where}prompt_ids")
        evaluated = result.get("tokens_evaluated")
        if evaluated is not None and evaluated != len(prompt):
            raise bad(f"{where}tokens_evaluated", f"{len(prompt)} (the prompt ids' length; send the prompt as "
                      "these token ids)", evaluated)
        tokens, values, temperature = _server_tokens(result, where)
        p = i // per_prompt
        if request_id is not None:
            group = request_id if len(prompts) == 1 else f"{request_id}/{p}"
            extra = {"sample_id": f"{request_id}/{i}"}
        else:
            group = "prompt-" + hashlib.blake2b(np.asarray(prompt, np.int64).tobytes(), digest_size=8).hexdigest()
            extra = {}
        # Fields a dump added next to the result (a reward, ...) apply to its row.
        extra.update({k: result[k] for k in _ROW_FIELDS if k in result})
        yield {"prompt_ids": prompt, "response_ids": tokens, "behavior_logprobs": values, "group_id": group,
               "temperature": temperature, **extra}


def _prompts(prompt_ids: Any, results: list) -> list:
    if prompt_ids is None:
        return [None]
    prompt_ids = list(prompt_ids)
    if prompt_ids and not isinstance(prompt_ids[0], (int, np.integer)):  # one list per prompt
        if len(results) % len(prompt_ids):
            raise bad("prompt_ids", f"one list per prompt, the {len(results)} results being prompts × n_cmpl",
                      Text(f"{len(prompt_ids)} lists"))
        return prompt_ids
    return [prompt_ids]


def _server_tokens(result: Mapping, where: str) -> tuple[list[int], list[float], float]:
    settings = result.get("generation_settings")
    if not isinstance(settings, Mapping):
        raise bad(f"{where}generation_settings", "the sampling settings of the result (do not filter them "
                  "out with response_fields)", settings)
    if settings.get("stream"):
        raise fragment(f"{where}generation_settings.stream", "false (an unstreamed result)", "true",
                       "the final event of a streamed answer, which carries no tokens or probabilities")
    temperature = _setting(settings, "temperature", where)
    if temperature <= 0:
        raise bad(f"{where}generation_settings.temperature", "a temperature > 0 (greedy decoding logs no "
                  "distribution to train against)", temperature)
    _refuse_samplers(settings, where)
    tokens = as_token_ids(result.get("tokens"), f"{where}tokens")
    if not tokens:
        raise bad(f"{where}tokens", "the sampled token ids (request return_tokens: true)", Text("an empty list"))
    probs = result.get("completion_probabilities")
    if not isinstance(probs, list) or not probs:
        raise bad(f"{where}completion_probabilities", "one entry per sampled token (request n_probs: 1 and "
                  "post_sampling_probs: true)", probs if not isinstance(probs, list) else Text("an empty list"))
    post = settings.get("post_sampling_probs")
    chain = settings.get("samplers")
    chain = _DEFAULT_SAMPLERS if chain is None else chain
    if not post:
        failed = [f"{k} {settings.get(k)} (needs {need})" for k, sampler, ok, need in _IDENTITY
                  if sampler in chain and not ok(_setting(settings, k, where))]
        failed += ["logit_bias (needs none)"] if settings.get("logit_bias") else []
        failed += ["ignore_eos (needs false)"] if settings.get("ignore_eos") else []
        if failed:
            raise bad(f"{where}completion_probabilities[0].logprob", "log-probs of the sampled distribution, but "
                      f"pre-sampling log-probs are of the raw T=1 logits and {', '.join(failed)} change it: {_FIX}",
                      Text("pre-sampling log-probs"))
    key, top = ("prob", "top_probs") if post else ("logprob", "top_logprobs")
    if len(probs) > len(tokens):
        raise bad(f"{where}completion_probabilities", f"at most {len(tokens)} entries (one per token)",
                  Text(f"{len(probs)}"))
    values = []
    for t, entry in enumerate(probs):
        field = f"{where}completion_probabilities[{t}]"
        if not isinstance(entry, Mapping):
            raise bad(field, "an object {id, token, bytes, " + key + ", " + top + "}", entry)
        if entry.get("id") != tokens[t]:
            raise bad(f"{field}.id", f"tokens[{t}] = {tokens[t]} (llama-server leaves out the probability of a "
                      "token that ends inside a UTF-8 character; sample with llamacpp_sample)", entry.get("id"))
        if not entry.get(top):
            raise bad(f"{field}.{top}", "the candidates the token was drawn from (speculative decoding logs its "
                      "accepted draft tokens with a placeholder probability 1: run without a draft model)",
                      entry.get(top))
        value = entry.get(key)
        if post:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise bad(f"{field}.prob", "a probability in (0, 1]", value)
            values.append(math.log(value))
        else:
            values.append(as_logprob(value, f"{field}.logprob"))
    if len(values) < len(tokens):
        if result.get("stop_type") != "word":
            raise bad(f"{where}completion_probabilities", f"{len(tokens)} entries (one per token; stop_type "
                      f"{result.get('stop_type')!r})", Text(f"{len(values)}"))
        tokens = tokens[: len(values)]  # the stop string's tokens have no probability: the row ends before them
        if not tokens:
            raise bad(f"{where}tokens", "a token before the stop string", Text("only the stop string's tokens"))
    return tokens, values, float(temperature) if "temperature" in chain else 1.0


def _setting(settings: Mapping, name: str, where: str) -> float:
    value = settings.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{where}generation_settings.{name}", "a number", value)
    return float(value)


def _refuse_samplers(settings: Mapping, where: str) -> None:
    """Settings under which no logged probability is the one the token was drawn from."""
    field = f"{where}generation_settings"
    if settings.get("grammar"):
        raise bad(f"{field}.grammar", "no grammar (llama.cpp samples first and checks the grammar after, so "
                  "the logged probabilities ignore it)", Text("a grammar"))
    if _setting(settings, "xtc_probability", where) > 0 and _setting(settings, "xtc_threshold", where) <= 0.5:
        raise bad(f"{field}.xtc_probability", "0 (XTC removes the top tokens at random: the logged distribution is "
                  "one branch of a mixture)", settings.get("xtc_probability"))
    if _setting(settings, "dynatemp_range", where) > 0:
        raise bad(f"{field}.dynatemp_range", "0 (dynamic temperature changes T per token; a row has one)",
                  settings.get("dynatemp_range"))
    if settings.get("mirostat"):
        raise bad(f"{field}.mirostat", "0 (mirostat truncates after the logged candidates)", settings.get("mirostat"))
    if any(s in ("adaptive_p", "adaptive-p") for s in settings.get("samplers") or []):
        raise bad(f"{field}.samplers", "no adaptive_p sampler (it draws by its own rule)", settings.get("samplers"))
    spec = settings.get("speculative.types")
    if spec not in (None, "none", ""):
        raise bad(f"{field}.speculative.types", "none (accepted draft tokens are logged with a placeholder "
                  "probability 1: run without speculative decoding)", spec)
    if settings.get("backend_sampling"):
        raise bad(f"{field}.backend_sampling", "false (the probabilities of backend sampling are not those "
                  "checked here)", True)


# ---- llama-server /completion streams ----------------------------------------------------------------------


class LlamacppStreams(Streams):
    """Events of llama-server's streamed `/completion` (`"stream": true`), one stream per (id_slot, index).

    Each token is one event (server-context.cpp `process_token` -> `send_partial_response`): `tokens` [id],
    `content`, one `completion_probabilities` entry (with n_probs > 0), `tokens_predicted` (tokens so far),
    `"stop": false`; the final event (`send_final_response`) has `"stop": true`, `stop_type`,
    `generation_settings` and no tokens or probabilities. A token that ends inside a UTF-8 character gets no
    event (`process_token` sends only complete text): `tokens_predicted` then runs ahead of the tokens
    streamed, and the stream is refused. `return_progress` events (`prompt_progress`) carry no token.
    """

    final_event = 'its final event ("stop": true)'

    def describe(self, key: Any) -> str:
        return f"stream of slot {key[0]} index {key[1]}"

    def pieces(self, data: Any) -> list:
        data = event_object(data, "a /completion stream event")
        if "prompt_progress" in data:
            return []
        return [((data.get("id_slot"), data.get("index", 0)), data)]

    def start(self, key: Any, piece: Any) -> dict:
        state = {"key": key, "tokens": [], "probs": [], "text": [], "events": 0, "final": piece}
        return self.extend(state, piece)

    def extend(self, state: dict, piece: Any) -> dict:
        state["final"] = piece
        if piece.get("stop") is True:
            if state["events"]:
                _check_predicted(piece, len(state["tokens"]))
            return state
        state["tokens"] += as_token_ids(piece.get("tokens"), "tokens")
        probs = piece.get("completion_probabilities")
        state["probs"] += probs if isinstance(probs, list) else []
        state["text"].append(str(piece.get("content") or ""))
        state["events"] += 1
        _check_predicted(piece, len(state["tokens"]))
        return state

    def last(self, piece: Any) -> bool:
        return piece.get("stop") is True

    def whole(self, state: dict) -> Any:
        final = state["final"]
        if not state["events"]:  # an unstreamed result: already whole
            return final
        settings = final.get("generation_settings")
        if isinstance(settings, Mapping):
            settings = {**settings, "stream": False}
        return {**final, "content": "".join(state["text"]), "tokens": state["tokens"],
                "completion_probabilities": state["probs"], "generation_settings": settings}


def _check_predicted(event: Mapping, streamed: int) -> None:
    predicted = event.get("tokens_predicted")
    if isinstance(predicted, int) and not isinstance(predicted, bool) and predicted != streamed:
        raise bad("tokens_predicted", f"{streamed} (the tokens streamed so far)", Text(
            f"{predicted}: llama-server sends no event for a token that ends inside a UTF-8 character (sample "
            "such text with llamacpp_sample), or events are missing from the log"))


def assemble_stream(events: Iterable[Any]) -> Iterator[dict]:
    """Whole `/completion` results from a streamed answer's events, one per (id_slot, index).

    `events`: the SSE lines of `/completion` with `"stream": true` (`data: {...}`), or their JSON, in
    order. Each result is yielded when its final event arrives, in the unstreamed shape, for
    `llamacpp_server_rows(result, prompt_ids)`. With a stop string the streamed tokens include the stop
    string's (each streamed with its probability), so the row keeps them; an unstreamed answer drops their
    probabilities and its row ends before them. A stream whose final event never comes is refused at the
    end (InputError naming it).
    """
    return assemble(LlamacppStreams(), events)
