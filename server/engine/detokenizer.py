"""Streaming text out of a stream of tokens: `IncrementalDetokenizer`, then `StopChecker`.

Per request, per new token (the engine's order):

    delta = detokenizer.push(token_id)          # complete characters only
    text, stopped = stop_checker.feed(delta)    # text before any stop string; partial matches held
    ... send text; if stopped: finish with reason "stop"

When generation ends for another reason (EOS, max_new_tokens), drain both in that order:

    text, stopped = stop_checker.feed(detokenizer.flush())   # the tail may still complete a stop
    if not stopped: text += stop_checker.flush()
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"
"""What decoding an incomplete UTF-8 sequence yields (byte-level BPE splits characters across tokens)."""

PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens decoded before the first output token, as vLLM does: decoders that drop a leading
space at the start of a text (SentencePiece's Metaspace) see that the output continues the prompt."""


class IncrementalDetokenizer:
    """Turns tokens into text deltas whose concatenation is
    `tokenizer.decode(output_ids, skip_special_tokens=True)`, never splitting a character.

    Exactly so for byte-level BPE (GPT-2, Llama 3, Qwen). Tokenizers that strip the leading space of
    a decode (Llama 2 / Mistral's "▁") give the text as it continues the prompt, " Hello" where
    decode(output_ids) says "Hello". An invalid byte run that ByteFallback later turns into U+FFFD
    as a whole may differ too (random models only).

    The prefix-offset/read-offset scheme of vLLM and TGI: decode a window of recent tokens
    `ids[prefix:]`, and emit what it adds beyond `decode(ids[prefix:read])`; hold the text back while
    it ends in U+FFFD (a character whose bytes have not all arrived). Only the window is kept.
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_token_ids[max(0, len(prompt_token_ids) - PROMPT_CONTEXT_TOKENS) :])
        self._read = len(self._ids)  # ids[:read] have been turned into text already
        self._prefix_text = self._decode(self._ids)  # decode(ids[:read]); the window starts at 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (often "", never a broken character)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of generation: whatever is held back, incomplete characters included (as U+FFFD,
        exactly as the full decode shows them)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix_text) or (text.endswith(REPLACEMENT) and not final):
            return ""  # a special token (no text), or a character still missing bytes
        delta = text[len(self._prefix_text) :]
        # The next window starts where this one's new tokens began: a character boundary, since the
        # text up to here ended in a complete character.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return delta


class StopChecker:
    """Finds stop strings in a stream of text deltas, across delta boundaries.

    `feed` emits the text that can no longer be part of a stop string and holds back the longest tail
    that is still the start of one. On a match it emits the text before the earliest match, reports
    stopped, and emits nothing afterwards; the stop string itself is never emitted.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        assert all(stop), "stop strings are non-empty (SamplingParams checks it)"
        self._stop = tuple(stop)
        self._first_chars = frozenset(s[0] for s in self._stop)
        self._longest = max((len(s) for s in self._stop), default=0)
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string has been seen)."""
        if self.stopped:
            return "", True
        if not self._stop:
            return delta, False
        # A match cannot start in text already emitted: no suffix of it was the start of a stop string.
        text = self._held + delta
        matches = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if matches:
            self.stopped = True
            self._held = ""
            return text[: min(matches)], True
        cut = self._partial_match_start(text)
        self._held = text[cut:]
        return text[:cut], False

    def flush(self) -> str:
        """At the end of generation for another reason: the held-back tail, which did not become a stop
        string."""
        held, self._held = self._held, ""
        return held

    def _partial_match_start(self, text: str) -> int:
        """Start of the longest suffix of `text` that is a proper prefix of a stop string (len(text)
        when there is none)."""
        for start in range(max(0, len(text) - self._longest + 1), len(text)):
            if text[start] in self._first_chars:
                tail = text[start:]
                if any(s.startswith(tail) for s in self._stop):
                    return start
        return len(text)
