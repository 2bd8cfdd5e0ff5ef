"""Streamed responses: an engine's stream events -> the whole responses its adapter reads.

Engines stream a response as pieces: vLLM's server chunks (`chat.completion.chunk`, completions chunks),
vLLM's offline `RequestOutputKind.DELTA` outputs, SGLang's `/generate` stream, llama-server's streamed
`/completion`. A piece passed as a response is refused by the adapters (`fragment`); a whole stream is
joined here into the response the same request would have returned unstreamed, so the adapters read it
with all their checks.

`Streams` holds the open streams of one engine, keyed (a response id and choice index, a request id, a
slot), and hands back each whole response as soon as its final event arrives: memory is what the open
streams hold. Each engine's subclass (in its adapter module) says how an event splits into pieces, how
a piece extends its stream, and which piece is the last.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import Any

from drpo_cli.base.errors import InputError
from drpo_cli.rollouts.adapters.common import Text, bad, value_of


class Done:
    """payload() of `data: [DONE]`: the end of one HTTP stream."""

    def __repr__(self) -> str:
        return "[DONE]"


DONE = Done()
WHOLE_STREAM = ("pass the whole stream (drpo convert --stream; Python: assemble_stream(events)); see "
                "docs/rollouts.md")


def fragment(field: str, expected: str, found: str, what: str) -> InputError:
    """The refusal of a piece of a stream passed as a whole response: what it is and the fix."""
    return bad(field, expected, Text(f"{found}: {what}: {WHOLE_STREAM}"))


def payload(event: Any) -> Any:
    """One stream event as data: the openai client's objects dumped, an SSE `data:` line's JSON, else as is.

    DONE for `data: [DONE]`; None for what carries no data: SSE comments (`: ping`), other SSE fields
    (`event: ...`), blank lines.
    """
    if hasattr(event, "model_dump"):  # openai client chunks: their extra fields (token_ids, ...) stay
        return event.model_dump(warnings=False)
    if isinstance(event, bytes):
        event = event.decode("utf-8", errors="replace")
    if not isinstance(event, str):
        return event
    text = event.strip()
    if not text or text.startswith(":") or text.split(":", 1)[0] in ("event", "id", "retry"):
        return None
    if text.startswith("data:"):
        text = text[5:].strip()
        if text == "[DONE]":
            return DONE
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"expected a stream event (JSON, or an SSE 'data:' line), found invalid JSON ({err.msg} "
                         f"at column {err.colno})") from None


def event_object(data: Any, what: str) -> Mapping:
    """An event's JSON object; an engine's error event (`{"error": ...}`) is refused: its stream broke off."""
    if not isinstance(data, Mapping):
        raise bad("(event)", f"{what} (a JSON object)", Text(type(data).__name__))
    if data.get("error") is not None:
        message = value_of(data["error"], "message") or data["error"]
        raise bad("error", what, Text(f"the server's error event ({str(message)[:80]!r}): the request failed and "
                                      "its stream broke off: drop its events"))
    return data


class Streams:
    """The open streams of one engine's events; subclasses define the pieces and how they join."""

    final_event = "its final event"  # what closes a stream, for the refusal of one left open

    def __init__(self) -> None:
        self.open: dict[Hashable, Any] = {}
        self.broken: set[Hashable] = set()  # streams refused mid-way: their later events are skipped
        self.refused: set[Hashable] = set()  # responses with a refused stream: their totals are not checked

    # ---- what each engine defines ----
    def pieces(self, data: Any) -> list[tuple[Hashable, Any]]:
        """The (stream key, piece) pairs of one event's data (none for an event that continues no stream)."""
        raise NotImplementedError

    def start(self, key: Hashable, piece: Any) -> Any:
        """A stream's state from its first piece."""
        raise NotImplementedError

    def extend(self, state: Any, piece: Any) -> Any:
        """The state with one more piece, checked against what came before."""
        raise NotImplementedError

    def last(self, piece: Any) -> bool:
        """Whether the piece ends its stream."""
        raise NotImplementedError

    def whole(self, state: Any) -> Any:
        """The response, in the unstreamed shape, of a stream whose last piece arrived."""
        raise NotImplementedError

    def describe(self, key: Hashable) -> str:
        return f"stream {key!r}"

    def response_key(self, key: Hashable) -> Hashable:
        """The key of the engine response a stream belongs to (its choices share it)."""
        return key

    # ---- the machinery ----
    def feed(self, event: Any) -> tuple[list[Hashable], list[tuple[Hashable, Any]]]:
        """(keys of the streams the event continues, [(key, whole response)] of those it ends)."""
        data = payload(event)
        if data is None or data is DONE:
            return [], []
        keys, done = [], []
        for key, piece in self.pieces(data):
            if key in self.broken:  # refused already: one problem per stream
                if self.last(piece):
                    self.broken.discard(key)
                continue
            state = self.open.pop(key, None)
            try:
                state = self.start(key, piece) if state is None else self.extend(state, piece)
            except InputError:
                if not self.last(piece):
                    self.broken.add(key)
                self.refused.add(self.response_key(key))
                raise
            keys.append(key)
            if self.last(piece):
                done.append((key, self.whole(state)))
            else:
                self.open[key] = state
        return keys, done

    def left_open(self) -> list[tuple[Hashable, str]]:
        """Each stream still open (its final event never came) with its refusal; afterwards none is open."""
        tail = "found none (the events end first: an incomplete stream)"
        out = [(key, f"{self.describe(key)}: expected {self.final_event}, {tail}") for key in self.open]
        self.open.clear()
        self.broken.clear()
        self.refused.clear()
        return out


def assemble(streams: Streams, events: Iterable[Any]) -> Iterator[Any]:
    """Each whole response as soon as its stream ends; InputError naming every stream left open at the end."""
    for event in events:
        for _, response in streams.feed(event)[1]:
            yield response
    problems = [message for _, message in streams.left_open()]
    if problems:
        raise InputError(problems[0], details=problems[1:])
