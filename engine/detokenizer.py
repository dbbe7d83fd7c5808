"""Incremental detokenization and stop strings.

Token ids arrive one at a time; ``tokenizers``' ``DecodeStream`` turns them into text
chunks, holding bytes back until they form whole UTF-8 characters. Stop strings are
searched only where new text could complete one; a matched stop string and what
follows it are never part of the output. While a request runs, the last
``max(len(stop)) - 1`` characters are held back from ``visible_text`` since they may
be the start of a stop string.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream


def backend_tokenizer(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a transformers tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} has no fast (tokenizers) backend")
    return backend


class IncrementalDetokenizer:
    __slots__ = ("_backend", "_holdback", "_stop", "_stream", "text")

    def __init__(self, backend: Any, skip_special_tokens: bool, stop: tuple[str, ...]) -> None:
        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Appends the token's text; returns the stop string it completed, if any
        (``text`` is then cut just before the stop string)."""
        chunk = self._stream.step(self._backend, token_id)
        if not chunk:
            return None
        start = max(0, len(self.text) - self._holdback)
        self.text += chunk
        if not (check_stop and self._stop):
            return None
        best: tuple[int, str] | None = None
        for s in self._stop:
            pos = self.text.find(s, start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        return best[1]

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: all of it once finished, else minus the holdback."""
        if finished or not self._holdback:
            return self.text
        return self.text[: max(0, len(self.text) - self._holdback)]
