"""A request's text as its tokens arrive: streamed decoding, stop strings, held-back tails."""

from __future__ import annotations

from typing import Any


class TextStream:
    """Host-side text of one request.

    Tokens go in one at a time (`put`); `take` gives the text that is safe to show: a suffix
    that may be the start of a stop string is held back until it is not, and a stop string cuts
    the text before it. The deltas join to the request's final text (the stream decoder holds a
    byte-fallback run back until it is complete).
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]):
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.stops = stops
        self.text = ""
        self.emitted = 0
        # A suffix this long may be the start of a stop string: held back until it is not.
        self.hold = max((len(s) for s in stops), default=1) - 1

    def put(self, token: int) -> bool:
        """Adds a token's text; True when the text now contains a stop string (and is cut)."""
        self.text += self.decoder.put(token)
        return self._cut()

    def finish(self) -> None:
        """No more tokens: flushes the decoder and releases the held-back tail."""
        self.text += self.decoder.flush()
        self._cut()
        self.hold = 0

    def _cut(self) -> bool:
        found = [i for i in (self.text.find(s, max(0, self.emitted - len(s)))
                             for s in self.stops) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
            self.hold = 0
        return bool(found)

    def take(self) -> str:
        end = max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta


def final_text(tokenizer: Any, ids: list[int], stop_ids: tuple[int, ...],
               stops: tuple[str, ...]) -> str | None:
    """A completion's text from its ids decoded at once (less a final stop id), cut before the
    first stop string."""
    if tokenizer is None:
        return None
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(cuts)] if cuts else text
