"""One answer's text as its tokens arrive: the deltas that are safe to send, and stop strings.

The text is the tokenizer's decode of every token so far (special tokens skipped), with leading and
trailing whitespace stripped as :func:`mmbridge.generate.chat` strips its answer. A delta holds back
what may still change: a trailing partial UTF-8 character (decoded as U+FFFD), trailing whitespace
(dropped if the answer ends there), and the last ``len(longest stop) - 1`` characters, which could
begin a stop string. The concatenated deltas are the final text.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence


class AnswerText:
    """The growing text of one row; :meth:`add` takes a token and returns ``(delta, stopped)``."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.holdback = max((len(stop) for stop in stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = ""

    def add(self, token: int) -> tuple[str, bool]:
        """Append ``token``; the new text to send, and whether a stop string ended the answer."""
        self.tokens.append(token)
        text = self._text()
        cut = min((index for index in (text.find(stop) for stop in self.stops) if index >= 0), default=-1)
        if cut >= 0:
            return self._advance(text[:cut].rstrip()), True
        safe = text[:len(text) - self.holdback] if self.holdback else text
        return self._advance(safe.rstrip(REPLACEMENT).rstrip()), False

    def finish(self) -> str:
        """The rest of the text once no token follows (trailing whitespace dropped)."""
        return self._advance(self._text().rstrip())

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()

    def _advance(self, text: str) -> str:
        """Send what ``text`` adds to what was sent (nothing if the decode rewrote the sent part)."""
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
